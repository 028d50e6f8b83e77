"""The public Python API: load a bundle once, then score and localise images.

    from decodiff_cli import Detector
    detector = Detector.load("model/")
    for result in detector.predict(["part1.png", "part2.png"]):
        print(result.path, result.score, result.is_anomalous)
        mask = result.mask  # bool (H, W) at the image's own resolution

Inputs are paths, PIL images or numpy arrays. A file that cannot be read gives a result
with ``error`` set (and no map) instead of stopping the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from decodiff_cli.bundle import Bundle, load_networks, load_normal_latents, read_bundle
from decodiff_cli.images import ImageReadError, ImageSource, load_image, map_to_original
from decodiff_cli.model import DecoDiffModel, Inference, InferenceOptions


@dataclass
class Prediction:
    path: str | None
    category: str | None = None
    score: float = float("nan")  # raw image score (MapConfig.score_top_fraction)
    threshold: float = float("nan")  # calibrated (or overridden) image threshold
    pixel_threshold: float = float("nan")
    anomaly_map: np.ndarray | None = None  # float32 (H, W) in [0, 1], original resolution
    original: Image.Image | None = None
    corrected: Image.Image | None = None  # the model's "normal" version of the image
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def normalized_score(self) -> float:
        """score / threshold: 1.0 is the decision boundary."""
        return self.score / self.threshold if self.threshold > 0 else float("nan")

    @property
    def is_anomalous(self) -> bool:
        return bool(self.error is None and self.score >= self.threshold)

    @property
    def mask(self) -> np.ndarray | None:
        return None if self.anomaly_map is None else self.anomaly_map >= self.pixel_threshold


class Detector:
    def __init__(self, bundle: Bundle, model: DecoDiffModel, batch_size: int = 8) -> None:
        self.bundle = bundle
        self.model = model
        self.batch_size = max(1, batch_size)
        self.categories = list(bundle.config.categories)
        self.thresholds: dict[str, dict] = dict(bundle.calibration.get("categories", {}))

    @classmethod
    def load(cls, bundle_path: str | Path, device: str = "auto", dtype: str = "auto", batch_size: int = 8) -> "Detector":
        bundle = read_bundle(Path(bundle_path))
        autoencoder, denoiser, reference = load_networks(bundle)
        model = DecoDiffModel(bundle.config, autoencoder, denoiser, device, dtype, reference, load_normal_latents(bundle))
        return cls(bundle, model, batch_size)

    @property
    def class_conditional(self) -> bool:
        return self.bundle.config.denoiser.num_classes > 0

    def check_category(self, name: str) -> str:
        if name not in self.categories:
            raise ValueError(f"unknown class {name!r}; this model knows: {', '.join(self.categories)}")
        return name

    def category_from_path(self, path: str | None) -> str | None:
        """A category named by a folder of the path (MVTec layout: <category>/test/...)."""
        if path is None or len(self.categories) == 1:
            return self.categories[0] if len(self.categories) == 1 else None
        parts = Path(path).parts[:-1]
        for part in reversed(parts):
            if part in self.categories:
                return part
        return None

    def infer(self, tensors: torch.Tensor, category: str | None, options: InferenceOptions | None = None) -> Inference:
        """Model-space inference for one category, or (None) for the category each image
        most likely belongs to (see ``guess_categories``); ``options.category`` is not read."""
        options = options or InferenceOptions()
        if category is not None:
            out = self.model.infer(tensors, self._labels(category, len(tensors)), options)
            out.categories = [category] * len(tensors)
            return out
        if len(self.categories) == 1:
            return self.infer(tensors, self.categories[0], options)
        began = time.perf_counter()
        z0 = self.model.encode(tensors)
        encode_s = time.perf_counter() - began  # model.infer is handed z0, so it cannot time this
        guesses = self.guess_categories(z0, tensors, options.steps)
        if not self.class_conditional:  # one denoiser pass serves every category
            ids = torch.tensor([self.categories.index(g) for g in guesses])
            out = self.model.infer(tensors, ids, options, z0=z0)
            out.categories = guesses
            out.timings["encode"] = out.timings.get("encode", 0.0) + encode_s
            return out
        parts = []
        for name in dict.fromkeys(guesses):
            rows = torch.tensor([i for i, g in enumerate(guesses) if g == name])
            parts.append((rows, self.model.infer(tensors[rows], self._labels(name, len(rows)), options, z0=z0[rows])))
        order = torch.cat([rows for rows, _ in parts]).argsort()

        def merged(attr: str) -> torch.Tensor | None:
            values = [getattr(out, attr) for _, out in parts]
            return None if values[0] is None else torch.cat(values)[order]

        timings = {k: sum(out.timings.get(k, 0.0) for _, out in parts) for k in parts[0][1].timings}
        timings["encode"] = timings.get("encode", 0.0) + encode_s
        return Inference(maps=merged("maps"), scores=merged("scores"), corrected=merged("corrected"),
                         timings=timings, categories=guesses)

    def infer_image(self, tensor: torch.Tensor, category: str | None, options: InferenceOptions | None = None) -> Inference:
        """One preprocessed image (``load_image(...).tensor``) -> its Inference (N = 1): the
        tensor itself, or with a tiled bundle its tiles, stitched (tiles.py)."""
        pre = self.bundle.config.preprocess
        if not pre.tiles:
            return self.infer(tensor[None], category, options)
        from decodiff_cli.tiles import infer_frame

        return infer_frame(lambda tiles: self.infer(tiles, category, options), tensor, pre,
                           self.bundle.config.anomaly_map.score_top_fraction, self.batch_size)

    def guess_categories(self, z0: torch.Tensor, tensors: torch.Tensor, steps: int | None = None) -> list[str]:
        """Nearest class centroid of the pooled latent (stored at fit time). Why not "the
        class under which the image looks most normal": an anomalous image is, by
        definition, abnormal under its own class, and often looks less so under another."""
        centroids = self.bundle.config.measured.class_centroids
        if set(centroids) == set(self.categories):
            table = torch.tensor([centroids[name] for name in self.categories])
            pooled = z0.float().mean(dim=(2, 3)).cpu()
            return [self.categories[i] for i in torch.cdist(pooled, table).argmin(dim=1).tolist()]
        # Bundles without centroids: the lowest score relative to each class's threshold.
        normalized = torch.stack([self.infer(tensors, name, InferenceOptions(steps=steps)).scores / self._threshold(name, "image_threshold")
                                  for name in self.categories])
        return [self.categories[i] for i in normalized.argmin(dim=0).tolist()]

    def _labels(self, category: str, n: int) -> torch.Tensor:
        return torch.full((n,), self.categories.index(self.check_category(category)), dtype=torch.long)

    def _threshold(self, category: str, key: str) -> float:
        try:
            return float(self.thresholds[category][key])
        except KeyError:
            raise ValueError(f"the bundle has no calibrated {key.replace('_', ' ')} for class {category!r}; "
                             "run `decodiff calibrate` or pass --threshold") from None

    def predict(self, sources: Iterable[ImageSource], options: InferenceOptions | None = None, **choices) -> Iterator[Prediction]:
        """Yield one Prediction per source, in order, batching internally. ``choices``: fields
        of InferenceOptions (``category=``, ``steps=``, ``threshold=`` ...), over ``options``."""
        options = replace(options or InferenceOptions(), **choices)
        if options.category is not None:
            self.check_category(options.category)
        batch: list[tuple[ImageSource, object]] = []
        for source in sources:
            batch.append((source, None))
            if len(batch) == self.batch_size:
                yield from self._predict_batch(batch, options)
                batch = []
        if batch:
            yield from self._predict_batch(batch, options)

    def _predict_batch(self, batch, options: InferenceOptions) -> Iterator[Prediction]:
        category, threshold, pixel_threshold = options.category, options.threshold, options.pixel_threshold
        pre = self.bundle.config.preprocess
        loaded: list = []
        for source, _ in batch:
            path = str(source) if isinstance(source, (str, Path)) else None
            try:
                loaded.append((path, load_image(source, pre), None))
            except ImageReadError as err:
                loaded.append((path, None, str(err)))
        good = [(path, image) for path, image, error in loaded if error is None]
        # Group by category so every forward pass has one class (and one threshold).
        results: dict[int, Prediction] = {}
        groups: dict[str | None, list[int]] = {}
        for index, (path, image) in enumerate(good):
            groups.setdefault(category or self.category_from_path(path), []).append(index)
        for name, members in groups.items():
            if pre.tiles:  # an image is a batch of its own tiles
                for i in members:
                    out = self.infer_image(good[i][1].tensor, name, options)
                    results[i] = self._prediction(*good[i], out, 0, out.categories[0], threshold, pixel_threshold)
                    results[i].timings = out.timings
                continue
            tensors = torch.stack([good[i][1].tensor for i in members])
            out = self.infer(tensors, name, options)
            chosen = out.categories
            for row, i in enumerate(members):
                path, image = good[i]
                results[i] = self._prediction(path, image, out, row, chosen[row], threshold, pixel_threshold)
                results[i].timings = {k: v / len(members) for k, v in out.timings.items()}
        it = iter(range(len(good)))
        for path, image, error in loaded:
            yield Prediction(path=path, error=error) if error is not None else results[next(it)]

    def _prediction(self, path, image, out: Inference, row: int, category: str, threshold, pixel_threshold) -> Prediction:
        pre = self.bundle.config.preprocess
        if not torch.isfinite(out.maps[row]).all():  # never let a NaN pass as "normal"
            return Prediction(path=path, category=category, error=f"{path or 'image'}: the model produced non-finite values")
        amap = map_to_original(out.maps[row].numpy(), image.original_size, pre)
        corrected = None
        if out.corrected is not None:
            pixels = ((out.corrected[row].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            corrected = Image.fromarray(pixels).resize(image.original_size, Image.Resampling.BICUBIC)
        return Prediction(
            path=path,
            category=category,
            score=float(out.scores[row]),
            threshold=threshold if threshold is not None else self._threshold(category, "image_threshold"),
            pixel_threshold=pixel_threshold if pixel_threshold is not None else self._threshold(category, "pixel_threshold"),
            anomaly_map=amap,
            original=image.original,
            corrected=corrected,
        )
