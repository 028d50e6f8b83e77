"""Give a bundle made without the map's decoder-feature term that term, to measure it on
the same weights (`--map-features` at fit time does the same from the training split).

Corrects and decodes up to 64 training images per class with the bundle's model, stores
the per-level feature scales (fitting.normal_statistics) in a new bundle with the feature
term on; weights, normal reference and thresholds are copied (the thresholds were
calibrated for the old map: recalibrate with `decodiff calibrate` before using them).

    python benchmarks/add_feature_term.py OLD_BUNDLE NEW_BUNDLE CLASS=DIR [CLASS=DIR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from decodiff_cli.bundle import AUTOENCODER, DENOISER, TRAINING_LOG, load_state, write_bundle
from decodiff_cli.config import TrainConfig
from decodiff_cli.detector import Detector
from decodiff_cli.fitting import normal_statistics, usable_images
from decodiff_cli.images import load_image
from decodiff_cli.latent_cache import build_cache


def main() -> None:
    old, new, pairs = Path(sys.argv[1]), Path(sys.argv[2]), [a.split("=", 1) for a in sys.argv[3:]]
    detector = Detector.load(old, device="cpu")
    bundle, model = detector.bundle, detector.model
    cfg = model.cfg
    paths, labels = [], []
    for name, folder in pairs:
        found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        paths += found
        labels += [cfg.categories.index(name)] * len(found)
    usable, _ = usable_images(paths, cfg, strict=True)
    cache = build_cache(lambda i: load_image(usable[i], cfg.preprocess).tensor, len(usable),
                        model.autoencoder, TrainConfig(augment_variants=1), torch.device("cpu"))
    cfg.anomaly_map.features = True
    _, cfg.anomaly_map.feature_scales = normal_statistics(model, cache, labels, cfg.categories)
    autoencoder = load_state(old / AUTOENCODER) if (old / AUTOENCODER).is_file() else {}
    write_bundle(new, cfg, load_state(old / DENOISER), autoencoder, bundle.calibration, old / TRAINING_LOG,
                 reference=model.reference)
    print(f"wrote {new}; feature scales {cfg.anomaly_map.feature_scales}")


if __name__ == "__main__":
    main()
