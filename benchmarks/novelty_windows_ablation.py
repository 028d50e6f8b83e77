"""One-off ablation (issue 20): rebuild a bundle's novelty bank with other windows, same weights.

    python benchmarks/novelty_windows_ablation.py SRC_BUNDLE DST_BUNDLE TRAIN_FOLDER 1,3

TRAIN_FOLDER: the folder of normal images the bundle was fitted on (one class); the
training split is rebuilt with the bundle's seed, view 0 encoded, and the bank and its
scale measured exactly as `fit` does.
"""

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from decodiff_cli.bundle import NORMAL_LATENTS, _save_tensors, load_networks, read_bundle
from decodiff_cli.fitting import normal_latents, split_holdout
from decodiff_cli.images import load_image
from decodiff_cli.inputs import find_training_images
from decodiff_cli.latent_cache import build_cache
from decodiff_cli.latents import LatentScaler

src, dst, folder, windows = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], [int(k) for k in sys.argv[4].split(",")]
torch.set_num_threads(1)
bundle = read_bundle(src)
cfg = bundle.config
images, _ = find_training_images([folder])
(name, paths), = images.items()
train_paths, _ = split_holdout(paths, cfg.train.holdout_fraction, cfg.train.min_holdout, cfg.train.seed)
autoencoder, _, _ = load_networks(bundle)
one_view = dataclasses.replace(cfg.train, augment_variants=1)
cache = build_cache(lambda i: load_image(train_paths[i], cfg.preprocess).tensor, len(train_paths), autoencoder,
                    one_view, torch.device("cpu"), tile=cfg.preprocess.shape if cfg.preprocess.tiles else None)
banks, scales = normal_latents(cache, [0] * len(train_paths), cfg.categories, LatentScaler(cfg.latent_scaling),
                               cfg.anomaly_map.novelty_bank, windows)
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst)
_save_tensors(dst / NORMAL_LATENTS, {k: v.half() for k, v in banks.items()})
config = json.loads((dst / "config.json").read_text())
config["anomaly_map"]["novelty_windows"] = windows
config["measured"]["novelty_scales"] = scales
(dst / "config.json").write_text(json.dumps(config, indent=2))
sums = json.loads((dst / "checksums.json").read_text())
(dst / "checksums.json").write_text(json.dumps({n: hashlib.sha256((dst / n).read_bytes()).hexdigest() for n in sums}, indent=2))
print(f"{dst}: windows {windows}, {len(train_paths)} training images, scale {scales}")
