"""Experiment: the discrepancy in the autoencoder decoder's feature space (not yet an option).

Instead of (or beside) |D(z0_hat) - D(z0)| on RGB, compare the TAESD-family decoder's
feature maps of the correction and of the input at each resolution before an upsampling
(32, 64, 128 px at 256 px input): the mean over channels of |F_l(z0_hat) - F_l(z0)|,
divided by its 99th percentile on normal training images, clipped at 2, upsampled and
averaged over the levels. Reads the tensors cached by map_variants.py (run it first).

    python benchmarks/feature_discrepancy.py BUNDLE CATEGORY_DIR PROTOCOL CACHE.pt ALIGNED(0|1)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from decodiff_cli.anomaly_map import latent_discrepancy, normal_reference
from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]


@torch.inference_mode()
def main() -> None:
    bundle, category_dir, protocol, cache, aligned = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
    detector = Detector.load(bundle, device="cpu")
    model, pre = detector.model, detector.bundle.config.preprocess
    decoder = model.autoencoder.decoder  # TAESD family: an nn.Sequential with nn.Upsample stages
    category = discover(category_dir)[0]
    saved = torch.load(cache)
    size = (pre.image_size, pre.image_size)

    def features(z: torch.Tensor) -> list[torch.Tensor]:
        x, found = model.scaler.denormalize(z), []
        for layer in decoder:
            if isinstance(layer, nn.Upsample):
                found.append(x)
            x = layer(x)
        return found

    def level_differences(z0: torch.Tensor, z0_hat: torch.Tensor) -> list[torch.Tensor]:
        parts = [[(a - b).abs().mean(1, keepdim=True) for a, b in zip(features(x), features(y))]
                 for x, y in zip(z0.split(8), z0_hat.split(8))]
        return [torch.cat([p[level] for p in parts]) for level in range(len(parts[0]))]

    normal = level_differences(saved["nz0"], saved["nz0_hat"])
    test = level_differences(saved["z0"], saved["z0_hat"])
    originals = [load_image(s.image, pre).original_size for s in category.samples]
    masks = np.stack([_protocol_mask(s, protocol) for s in category.samples])
    labels = np.array([s.label for s in category.samples])

    def evaluate(name: str, maps: torch.Tensor) -> None:
        maps = np.stack([to_protocol(map_to_original(m.numpy(), o, pre), protocol) for m, o in zip(maps[:, 0], originals)])
        values = compute_metrics(maps.reshape(len(maps), -1).max(1), labels, maps, masks).values
        print(f"{name:28s}", " ".join(f"{values[k]:.3f}" for k in KEYS), flush=True)

    print(f"{'map':28s}", " ".join(KEYS))
    levels = []
    for index, (n, t) in enumerate(zip(normal, test)):
        scale = torch.quantile(n.flatten(), 0.99)
        levels.append(F.interpolate((t / scale).clamp(0, 2) / 2, size=size, mode="bilinear", align_corners=False))
        evaluate(f"level {index} ({t.shape[-1]} px)", levels[-1])
    feature = torch.stack(levels).mean(0)
    evaluate("feature", feature)
    if aligned:
        delta = (saved["nz0_hat"] - saved["nz0"]).abs().mean(1, keepdim=True)
        reference = normal_reference(delta)[None].expand(len(saved["z0"]), -1, -1, -1)
        latent = latent_discrepancy(saved["z0_hat"], saved["z0"], 6.0, 1.0, size, reference)
    else:
        latent = latent_discrepancy(saved["z0_hat"], saved["z0"], 0.5, 1.0, size)
    evaluate("latent+pixel (the default)", (latent + saved["pixel"]) / 2)
    evaluate("latent+feature", (latent + feature) / 2)
    evaluate("latent+feature+pixel", (latent + feature + saved["pixel"]) / 3)


if __name__ == "__main__":
    main()
