"""Give a bundle made without one of the map's fit-time terms that term, to measure it on
the same weights (`--map-features` / `--map-novelty` at fit time do the same from the
training split):
- features: corrects and decodes up to 64 training images per class with the bundle's
  model and stores the per-level decoder-feature scales (fitting.normal_statistics);
- novelty: stores the normal latents of the training images and the unit of their
  distances (fitting.normal_latents).
Weights, normal reference, the other terms and thresholds are copied (the thresholds were
calibrated for the old map: recalibrate with `decodiff calibrate` before using them).

    python benchmarks/add_map_term.py OLD_BUNDLE NEW_BUNDLE features|novelty CLASS=DIR [CLASS=DIR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from decodiff_cli.bundle import AUTOENCODER, DENOISER, TRAINING_LOG, load_state, write_bundle
from decodiff_cli.config import TrainConfig
from decodiff_cli.detector import Detector
from decodiff_cli.fitting import normal_latents, normal_statistics, usable_images
from decodiff_cli.images import load_image
from decodiff_cli.latent_cache import build_cache


def main() -> None:
    old, new, term, pairs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], [a.split("=", 1) for a in sys.argv[4:]]
    if term not in ("features", "novelty"):
        raise SystemExit(f"unknown term {term!r}: features or novelty")
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
    banks = model.normal_latents or None
    if term == "features":
        cfg.anomaly_map.features = True
        _, cfg.anomaly_map.feature_scales = normal_statistics(model, cache, labels, cfg.categories)
    else:
        cfg.anomaly_map.novelty = True
        banks, cfg.anomaly_map.novelty_scales = normal_latents(cache, labels, cfg.categories, model.scaler,
                                                                     cfg.anomaly_map.novelty_bank)
    autoencoder = load_state(old / AUTOENCODER) if (old / AUTOENCODER).is_file() else {}
    write_bundle(new, cfg, load_state(old / DENOISER), autoencoder, bundle.calibration, old / TRAINING_LOG,
                 reference=model.reference, normal_latents=banks)
    print(f"wrote {new}; feature scales {cfg.anomaly_map.feature_scales}, novelty scales {cfg.anomaly_map.novelty_scales}")


if __name__ == "__main__":
    main()
