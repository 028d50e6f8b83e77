"""Experiment behind `--shifted-view`: the map of the input, of a copy shifted by D pixels
(4 = half a latent pixel of an 8x autoencoder; the map shifted back), and their mean
(what the option computes for classes without their own normal reference).

A shift moves the 8x8 grid of the autoencoder over the image, so the correction's
response to normal texture changes while a real defect stays: averaging the two maps
keeps the defect and thins out the texture noise. Costs a second inference per image.

    python benchmarks/shift_views.py BUNDLE CATEGORY_DIR PROTOCOL D
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from decodiff_cli.anomaly_map import shift_images
from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]
torch.set_num_threads(1)


@torch.inference_mode()
def main() -> None:
    bundle, category_dir, protocol, d = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    detector = Detector.load(bundle, device="cpu")
    pre = detector.bundle.config.preprocess
    samples = discover(category_dir)[0].samples
    ids = detector._labels(detector.categories[0], 1)
    base, shifted = [], []
    for i in range(0, len(samples), 8):
        x = torch.stack([load_image(s.image, pre).tensor for s in samples[i:i + 8]])
        c = ids.expand(len(x))
        base.append(detector.model.infer(x, c).maps)
        shifted.append(shift_images(detector.model.infer(shift_images(x, d), c).maps[:, None], -d)[:, 0])
    base, shifted = torch.cat(base), torch.cat(shifted)
    originals = [load_image(x.image, pre).original_size for x in samples]
    masks = np.stack([_protocol_mask(x, protocol) for x in samples])
    labels = np.array([x.label for x in samples])

    def evaluate(name: str, maps: torch.Tensor) -> None:
        maps = np.stack([to_protocol(map_to_original(mm.numpy(), o, pre), protocol) for mm, o in zip(maps, originals)])
        v = compute_metrics(maps.reshape(len(maps), -1).max(1), labels, maps, masks).values
        print(f"{name:20s}", " ".join(f"{v[k]:.3f}" for k in KEYS), flush=True)

    print(f"{'map':20s}", " ".join(KEYS))
    evaluate("input", base)
    evaluate(f"shifted by {d}", shifted)
    evaluate("mean of both", (base + shifted) / 2)


if __name__ == "__main__":
    main()
