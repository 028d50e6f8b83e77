"""The trivial "mean latent" baseline: how far is a test latent from the average normal one?

    python examples/mean_latent_baseline.py DATASET_CATEGORY_DIR --out maps/ \\
        [--autoencoder taef2] [--protocol paper] [--max-train 64]
    decodiff benchmark DATASET_CATEGORY_DIR --maps maps/ --protocol paper

No training at all: the training images are encoded with a frozen autoencoder, every
latent channel is standardised with the training statistics, and the per-position mean
of the standardised training latents is the "normal" latent. A test image's map is
|z - mean| averaged over channels, upsampled bilinearly to 256x256 and blurred (Gaussian,
sigma 4 px in image space). It is the floor any learned method (DeCo-Diff included)
should clear by a wide margin; on aligned objects it is already far from random.

Maps are written in MVTec's evaluation layout, ``OUT/<category>/test/<defect>/<stem>.tiff``
(float32, 256x256, in the protocol's geometry: ``paper`` = resize 288 + centre crop 256,
``full`` = resize the whole image to 256), which is what ``decodiff benchmark --maps``
reads. Maps are divided by one global factor (the largest map value over the training
images), so normal images score about <= 1; the metrics are rank-based and do not care.

Speed: TAEF2 encodes about 1-3 images/s on two CPU cores, so the 492 magnetic-tile test
images take several minutes. On a CPU shared with other jobs ``--threads 1`` was faster
than torch's default of 2 (bottle, all 209 training images: 114 s vs 161 s for 64).

DATASET may be one MVTec category folder (``<cat>/train/good``, ``<cat>/test/<defect>``)
or an MVTec root holding several; every category gets its own mean latent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from decodiff_cli.anomaly_map import gaussian_blur
from decodiff_cli.autoencoders import load_autoencoder
from decodiff_cli.benchmark import PROTOCOLS
from decodiff_cli.datasets import discover
from decodiff_cli.datasets import IMAGE_SUFFIXES
from decodiff_cli.config import PreprocessConfig, parse_image_size
from decodiff_cli.images import load_image
from decodiff_cli.latents import LatentScaler, fit_scaling


@torch.no_grad()
def encode(paths: list[Path], autoencoder, pre: PreprocessConfig, batch_size: int, label: str | None) -> torch.Tensor:
    """Raw latents (N, C, h, w) float32 of the images, preprocessed like the protocol."""
    out, started = [], time.perf_counter()
    for start in range(0, len(paths), batch_size):
        chunk = torch.stack([load_image(p, pre).tensor for p in paths[start : start + batch_size]])
        out.append(autoencoder.encode(chunk).float())
        if label:
            done = min(start + batch_size, len(paths))
            rate = done / (time.perf_counter() - started)
            print(f"\r  encoding {label}: {done}/{len(paths)} ({rate:.2f} images/s)", end="", file=sys.stderr, flush=True)
    if label:
        print(file=sys.stderr)
    return torch.cat(out)


def latent_maps(z: torch.Tensor, mean: torch.Tensor, shape: tuple[int, int], sigma: float) -> torch.Tensor:
    """(N, C, h, w) standardised latents -> (N, H, W) maps."""
    diff = (z - mean).abs().mean(dim=1, keepdim=True)
    up = F.interpolate(diff, size=shape, mode="bilinear", align_corners=False)
    return gaussian_blur(up, sigma)[:, 0]


def evenly_spaced(paths: list[Path], limit: int) -> list[Path]:
    if limit <= 0 or len(paths) <= limit:
        return paths
    picks = np.linspace(0, len(paths) - 1, limit).round().astype(int)
    return [paths[i] for i in picks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="an MVTec category folder, or a root of several")
    parser.add_argument("--out", type=Path, required=True, help="maps folder (MVTec evaluation layout)")
    parser.add_argument("--autoencoder", default="taef2",
                        help="autoencoder spec, as decodiff fit --autoencoder (default: the packaged TAEF2)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper",
                        help="paper: resize 288 + centre crop 256; full: resize the whole image to 256")
    parser.add_argument("--category", action="append", help="only these categories (repeatable)")
    parser.add_argument("--max-train", type=int, default=64,
                        help="encode at most this many training images, evenly spaced (0 = all; default 64)")
    parser.add_argument("--image-size", default=None,
                        help="WxH: resize each whole image to W x H instead (no crop; maps at WxH, for "
                             "`decodiff benchmark --protocol native`)")
    parser.add_argument("--sigma", type=float, default=4.0, help="Gaussian blur of the 256x256 map, in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); on a CPU other jobs keep busy, 1 is often faster")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        categories = discover(args.dataset, args.category)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resize, crop = PROTOCOLS[args.protocol]
    pre = PreprocessConfig(image_size=crop, resize=resize)
    if args.image_size:
        width, height = parse_image_size(args.image_size)
        pre = PreprocessConfig(image_size=width, resize=width, image_height=height)
    autoencoder = load_autoencoder(args.autoencoder)
    print(f"autoencoder {args.autoencoder}: {autoencoder.latent_channels} channels, /{autoencoder.downsample}; "
          f"input {pre.describe()}; torch threads {torch.get_num_threads()}")

    for cat in categories:
        folder = cat.samples[0].image.parents[2]  # <category>/test/<defect>/<image>
        train_dir = folder / "train" / "good"
        if not train_dir.is_dir():
            print(f"error: {cat.name}: no training images in {train_dir} (MVTec layout needed)", file=sys.stderr)
            return 2
        all_train = sorted(p for p in train_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        train = evenly_spaced(all_train, args.max_train)
        started = time.perf_counter()
        print(f"{cat.name}: {len(train)} of {len(all_train)} training images, {len(cat.samples)} test images")

        raw = encode(train, autoencoder, pre, args.batch_size, f"{cat.name} train")
        scaler = LatentScaler(fit_scaling(raw, "channel"))  # per-channel standardisation
        z_train = scaler.normalize(raw)
        mean = z_train.mean(dim=0, keepdim=True)  # (1, C, h, w): the mean normal latent, per position
        # One global factor: the largest value of any training map (a normal image scores ~<= 1).
        scale = float(latent_maps(z_train, mean, pre.shape, args.sigma).max().clamp(min=1e-12))

        written, total, test_started = 0, len(cat.samples), time.perf_counter()
        for start in range(0, total, args.batch_size):
            chunk = cat.samples[start : start + args.batch_size]
            z = scaler.normalize(encode([s.image for s in chunk], autoencoder, pre, args.batch_size, None))
            maps = (latent_maps(z, mean, pre.shape, args.sigma) / scale).numpy().astype(np.float32)
            for sample, amap in zip(chunk, maps):
                target = args.out / cat.name / "test" / sample.defect / f"{sample.image.stem}.tiff"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(amap), "F").save(target)
                written += 1
            rate = written / (time.perf_counter() - test_started)
            print(f"\r  scoring {cat.name} test: {written}/{total} ({rate:.2f} images/s)", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        print(f"{cat.name}: wrote {written} maps to {args.out / cat.name} in {time.perf_counter() - started:.0f} s")

    names = " ".join(f"--category {c.name}" for c in categories) if args.category else ""
    protocol = "native" if args.image_size else args.protocol
    print(f"next: decodiff benchmark {args.dataset} --maps {args.out} --protocol {protocol} {names}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
