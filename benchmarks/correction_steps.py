"""Correction schedules that stop before t = 0, on the test latents cached by
map_variants.py: latent-only maps (clip 0.5), scored like `decodiff benchmark`.

    python benchmarks/correction_steps.py BUNDLE CATEGORY_DIR PROTOCOL CACHE.pt "8;8,4;8,6,4"
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from decodiff_cli.anomaly_map import latent_discrepancy
from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.deviation import correct
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]


@torch.inference_mode()
def main() -> None:
    bundle, category_dir, protocol, cache, schedules = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    detector = Detector.load(bundle, device="cpu")
    model, pre = detector.model, detector.bundle.config.preprocess
    samples = discover(category_dir)[0].samples
    z0 = torch.load(cache)["z0"]
    originals = [load_image(s.image, pre).original_size for s in samples]
    masks = np.stack([_protocol_mask(s, protocol) for s in samples])
    labels = np.array([s.label for s in samples])
    ids = detector._labels(detector.categories[0], 1)

    def eps_theta(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.denoiser(z, t, ids.expand(len(z)) if detector.class_conditional else None).float()

    print("timesteps", " ".join(KEYS))
    for schedule in schedules.split(";"):
        steps = [int(t) for t in schedule.split(",")]
        z0_hat = torch.cat([correct(eps_theta, chunk, model.abar, steps, "z_{t-1}") for chunk in z0.split(16)])
        maps = latent_discrepancy(z0_hat, z0, 0.5, 1.0, (pre.image_size, pre.image_size))[:, 0]
        maps = np.stack([to_protocol(map_to_original(m.numpy(), o, pre), protocol) for m, o in zip(maps, originals)])
        values = compute_metrics(maps.reshape(len(maps), -1).max(1), labels, maps, masks).values
        print(steps, " ".join(f"{values[k]:.3f}" for k in KEYS), flush=True)


if __name__ == "__main__":
    main()
