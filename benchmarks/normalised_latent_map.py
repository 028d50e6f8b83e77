"""Experiment: normalise the latent discrepancy by its statistics on normal images.

DeCo-Diff's latent discrepancy |z0_hat - z0| is not zero on normal images: some places
(edges, highlights of an aligned object) are always corrected a little. This script
measures whether subtracting the per-position mean of that discrepancy over normal
training images ("minus_mu"), or dividing by its spread too ("zscore"), improves the
maps. "zscore" is now `--map-reference position`; the figures are in benchmarks/RESULTS.md.

    python benchmarks/normalised_latent_map.py BUNDLE CATEGORY_DIR PROTOCOL N_TRAIN
    python benchmarks/normalised_latent_map.py model ../shared/data/mvtec_bottle/bottle paper 40
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from decodiff_cli.anomaly_map import gaussian_blur, normal_reference, pixel_discrepancy
from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.deviation import correct
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]


def main() -> None:
    bundle, category_dir, protocol, n_train = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    detector = Detector.load(bundle, device="cpu")
    model, cfg = detector.model, detector.bundle.config
    pre = cfg.preprocess

    def latents(tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z0 = torch.cat([model.encode(chunk) for chunk in tensors.split(8)])
        eps = lambda z, t: model.denoiser(z, t, None).float()  # noqa: E731
        z0_hat = torch.cat([correct(eps, chunk, model.abar, cfg.correction.timesteps(), cfg.correction.strategy)
                            for chunk in z0.split(8)])
        return z0, z0_hat

    # Statistics of the discrepancy on (evenly spaced) normal training images.
    train = sorted((category_dir / "train" / "good").iterdir())
    train = train[:: max(1, len(train) // n_train)][:n_train]
    z0, z0_hat = latents(torch.stack([load_image(p, pre).tensor for p in train]))
    normal = (z0_hat - z0).abs().mean(1)
    mu, sd = normal_reference(normal[:, None])

    category = discover(category_dir)[0]
    loaded = [load_image(s.image, pre) for s in category.samples]
    masks = np.stack([_protocol_mask(s, protocol) for s in category.samples])
    labels = np.array([s.label for s in category.samples])
    z0, z0_hat = latents(torch.stack([im.tensor for im in loaded]))
    discrepancy = (z0_hat - z0).abs().mean(1)
    reconstructed = torch.cat([model.decode(c) for c in z0.split(8)])
    corrected = torch.cat([model.decode(c) for c in z0_hat.split(8)])
    pixel = pixel_discrepancy(corrected, reconstructed, cfg.anomaly_map.pixel_clip, cfg.anomaly_map.pixel_sigma)[:, 0]
    size = pre.image_size

    def evaluate(latent: torch.Tensor, name: str, clip: float) -> None:
        latent = gaussian_blur((latent.clamp(0, clip) / clip)[:, None], cfg.anomaly_map.latent_sigma)
        latent = F.interpolate(latent, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        for combine, maps in (("latent", latent), ("arithmetic", (latent + pixel) / 2)):
            maps = np.stack([to_protocol(map_to_original(m.numpy(), im.original_size, pre), protocol)
                             for m, im in zip(maps, loaded)])
            values = compute_metrics(maps.reshape(len(maps), -1).max(1), labels, maps, masks).values
            print(name, combine, clip, " ".join(f"{values[k]:.3f}" for k in KEYS), flush=True)

    print("variant combine clip", " ".join(KEYS))
    evaluate(discrepancy, "raw", 0.5)
    evaluate(discrepancy - mu, "minus_mu", 0.5)
    for clip in (3.0, 6.0):
        evaluate((discrepancy - mu) / (sd + sd.mean()), "zscore", clip)


if __name__ == "__main__":
    main()
