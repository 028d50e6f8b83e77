"""Give a unified bundle made before class centroids existed its centroids.

`decodiff fit` now stores, per class, the mean normalised training latent pooled over
space (fitting.class_centroids), used to infer an image's class. This script computes
the same from the training images of each class and writes a new bundle (same weights
and thresholds, new checksums).

    python benchmarks/add_class_centroids.py OLD_BUNDLE NEW_BUNDLE CLASS=DIR [CLASS=DIR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from decodiff_cli.bundle import AUTOENCODER, DENOISER, TRAINING_LOG, load_state, read_bundle, write_bundle
from decodiff_cli.config import TrainConfig
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image
from decodiff_cli.fitting import class_centroids, usable_images
from decodiff_cli.latent_cache import build_cache


def main() -> None:
    old, new, pairs = Path(sys.argv[1]), Path(sys.argv[2]), [a.split("=", 1) for a in sys.argv[3:]]
    bundle = read_bundle(old)
    cfg = bundle.config
    detector = Detector.load(old, device="cpu")
    paths, labels = [], []
    for name, folder in pairs:
        found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        paths += found
        labels += [cfg.categories.index(name)] * len(found)
    usable, _ = usable_images(paths, cfg, strict=True)
    cache = build_cache(lambda i: load_image(usable[i], cfg.preprocess).tensor, len(usable),
                        detector.model.autoencoder, TrainConfig(augment_variants=1), torch.device("cpu"))
    cfg.class_centroids = class_centroids(cache, labels, cfg.categories, detector.model.scaler)
    autoencoder = load_state(old / AUTOENCODER) if (old / AUTOENCODER).is_file() else {}
    write_bundle(new, cfg, load_state(old / DENOISER), autoencoder, bundle.calibration, old / TRAINING_LOG)
    print(f"wrote {new} with centroids for {', '.join(cfg.class_centroids)}")


if __name__ == "__main__":
    main()
