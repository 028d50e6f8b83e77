"""A bundle as a map source for ``benchmark.evaluate``, with speed measurement."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from decodiff_cli.benchmark import NATIVE, PROTOCOLS, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.model import InferenceOptions


class BundlePredictor:
    """predict(paths, category) -> (map in the protocol's space, the bundle's own image
    score, as `decodiff score` gives it) per path.

    When the bundle's own geometry is the protocol's (e.g. resize 288, crop 256 for
    `paper`), its maps are used as they are; otherwise they go back to the original
    image (`native`: and stay there, as `localize` writes them) and through the
    protocol's transform, like any other method's maps.
    """

    def __init__(self, detector: Detector, protocol: str, steps: int | None = None, infer_class: bool = False) -> None:
        self.detector = detector
        self.protocol = protocol
        self.steps = steps
        self.infer_class = infer_class
        pre = detector.bundle.config.preprocess
        self.same_geometry = not (pre.image_height or pre.tiles) and PROTOCOLS.get(protocol) == (pre.resize, pre.image_size)
        self.timed_images = 0
        self.timed_seconds = 0.0
        self.stage_seconds: dict[str, float] = {}
        self.warm = False

    def category_for(self, name: str) -> str | None:
        if self.infer_class:
            return None
        known = self.detector.categories
        if name in known:
            return name
        if len(known) == 1:
            return known[0]
        raise ValueError(f"category {name!r} is not in this model ({', '.join(known)}); use --infer-class")

    def __call__(self, paths: list[Path], category: str) -> Iterator[np.ndarray]:
        pre = self.detector.bundle.config.preprocess
        model_category = self.category_for(category)
        size = self.detector.batch_size
        for start in range(0, len(paths), size):
            images = [load_image(p, pre) for p in paths[start : start + size]]
            began, options = time.perf_counter(), InferenceOptions(steps=self.steps)
            if pre.tiles:  # one image at a time, each a batch of its own tiles
                outs = [self.detector.infer_image(im.tensor, model_category, options) for im in images]
            else:
                outs = [self.detector.infer(torch.stack([im.tensor for im in images]), model_category, options)]
            elapsed = time.perf_counter() - began
            if self.warm:  # the first batch pays for allocation and kernel selection
                self.timed_images += len(images)
                self.timed_seconds += elapsed
                for out in outs:
                    for key, value in out.timings.items():
                        self.stage_seconds[key] = self.stage_seconds.get(key, 0.0) + value
            self.warm = True
            maps = [m for out in outs for m in out.maps.numpy()]
            scores = [v for out in outs for v in out.scores.tolist()]
            for image, amap, score in zip(images, maps, scores):
                if self.protocol == NATIVE:
                    amap = map_to_original(amap, image.original_size, pre)
                elif not self.same_geometry:
                    amap = to_protocol(map_to_original(amap, image.original_size, pre), self.protocol)
                yield amap, score

    def speed(self) -> dict:
        model = self.detector.model
        n = max(self.timed_images, 1)
        return {
            "images_per_s": self.timed_images / self.timed_seconds if self.timed_seconds else float("nan"),
            "seconds_per_image": {k: v / n for k, v in self.stage_seconds.items()},
            "device": str(model.device),
            "dtype": model.dtype,
            "batch_size": self.detector.batch_size,
            "steps": self.steps or model.cfg.correction.num_calls,
            "timed_images": self.timed_images,
        }
