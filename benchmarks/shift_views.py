"""Experiment (not yet an option): average the map over the input and a copy shifted by
D pixels (4 = half a latent pixel of an 8x autoencoder), the shifted map shifted back.

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
from torch.nn import functional as F

from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]
torch.set_num_threads(1)


def shift(x: torch.Tensor, d: int) -> torch.Tensor:
    """Content moves by d pixels down and right (up and left when negative); borders replicated."""
    size, p = x.shape[-1], abs(d)
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    o = p - d
    return padded[..., o:o + size, o:o + size]


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
        shifted.append(shift(detector.model.infer(shift(x, d), c).maps[:, None], -d)[:, 0])
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
