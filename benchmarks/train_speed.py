"""Training throughput: cached latents versus running the encoder on every step.

    python benchmarks/train_speed.py [--model-size xs] [--batch-size 8] [--steps 2]
                                     [--image-size 256] [--autoencoder taef2]

Both modes run the training step of ``decodiff_cli.training.train`` on the CPU: latent
scaling, masked corruption (``deviation.corrupt``), denoiser forward, MSE on the direction
of deviation, backward, gradient clipping, AdamW step, EMA update. "encode every step"
does the same plus ``autoencoder.encode`` of the batch's images (no grad) first, which is
what training without the latent cache (``latent_cache.py``) would cost.

The two modes are interleaved step by step (cached, encode, cached, encode, ...) so that
load from other processes hits both alike; the figure per mode is the median step time
after ``--warmup`` untimed steps (the fastest step is shown too: the least disturbed
one). On a shared CPU the numbers are noisy: compare the
ratio, and rerun with more ``--steps`` before quoting absolute images/s. ``--threads auto``
(the default) uses one torch thread when the CPU is already busy: on an oversubscribed
CPU OpenMP threads wait on each other at every op, and we saw the same training step take
2.8 s or 22 s with 2 threads, 1.3 s with 1.

It also prints what the cache costs: float16 latents, ``views`` per image (the original
plus shifted copies), so bytes = N * views * C * h * w * 2 (linear in N). Caches larger
than ``latent_cache.RAM_LIMIT_BYTES`` are memory-mapped from disk during ``decodiff fit``.

Training images come from ``../shared/data/mvtec_bottle/bottle/train/good`` when present,
else random pixels (the cost of a step does not depend on the pixels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from decodiff_cli.autoencoders import AutoencoderUnavailable, load_autoencoder
from decodiff_cli.config import DenoiserConfig, ModelConfig, PreprocessConfig, TrainConfig
from decodiff_cli.denoiser import Denoiser, count_parameters
from decodiff_cli.deviation import alpha_bars, corrupt, sample_patch_size
from decodiff_cli.latent_cache import RAM_LIMIT_BYTES, build_cache
from decodiff_cli.latents import LatentScaler, fit_scaling
from _common import choose_threads  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BOTTLE_TRAIN = SHARED / "data" / "mvtec_bottle" / "bottle" / "train" / "good"
DEFAULT_AE = "taef2"  # packaged with decodiff


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def load_images(count: int, size: int) -> tuple[list[torch.Tensor], str]:
    if BOTTLE_TRAIN.is_dir():
        from decodiff_cli.images import load_image

        paths = sorted(BOTTLE_TRAIN.glob("*.png"))[:count]
        if len(paths) == count:
            pre = PreprocessConfig(image_size=size, resize=size)
            return [load_image(p, pre).tensor for p in paths], f"{count} bottle training images"
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, size, size, generator=generator) * 2 - 1 for _ in range(count)], f"{count} random images"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="xs", help="denoiser size (tiny, xs, s, m, l, xl)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--autoencoder", default=DEFAULT_AE, help="autoencoder spec (folder, 'pixel', ...)")
    parser.add_argument("--views", type=int, default=TrainConfig().augment_variants,
                        help="cached views per image (decodiff fit's --augment-variants)")
    parser.add_argument("--cache-images", default="209,500,5000,50000",
                        help="image counts for the cache-size table (comma-separated)")
    parser.add_argument("--threads", default="auto",
                        help="torch threads; auto (default): 1 when the CPU is already busy, else torch's default")
    args = parser.parse_args(argv)
    threads_why = choose_threads(args.threads)

    try:
        autoencoder = load_autoencoder(args.autoencoder)
    except AutoencoderUnavailable as err:
        print(f"skipped: {err}")
        return 0
    if args.image_size % autoencoder.downsample:
        print(f"error: --image-size must be a multiple of {autoencoder.downsample}", file=sys.stderr)
        return 2
    side = args.image_size // autoencoder.downsample
    channels = autoencoder.latent_channels
    tc = TrainConfig(batch_size=args.batch_size, augment_variants=args.views)
    cfg = ModelConfig(
        preprocess=PreprocessConfig(image_size=args.image_size, resize=args.image_size),
        denoiser=DenoiserConfig(size=args.model_size, latent_channels=channels, latent_size=side),
        train=tc,
    )
    print(f"decodiff train speed: {args.autoencoder} ({channels} x {side} x {side} latents), denoiser "
          f"{args.model_size}, batch {args.batch_size}, {args.image_size} px, CPU, {torch.get_num_threads()} "
          f"torch threads ({threads_why})")
    print("NOTE: the CPU is shared with other processes: timings are noisy; the ratio is the robust figure.")

    images, source = load_images(args.batch_size, args.image_size)
    began = time.perf_counter()
    cache = build_cache(images, len(images), autoencoder, tc, torch.device("cpu"))
    cache_s = time.perf_counter() - began
    print(f"cache: {source} x {args.views} views encoded in {cache_s:.1f} s "
          f"({cache_s / len(images):.2f} s/image, once per training run)")
    cfg.latent_scaling = fit_scaling(cache.latents[:, 0].float(), "channel")
    pixels = torch.stack(images)

    torch.manual_seed(tc.seed)
    model = Denoiser(cfg.denoiser)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    # The EMA of the weights, as training.train keeps it (its class is private, so the same
    # lerp over the state dict is written out here: the cost is what matters).
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if tc.ema_decay > 0 else None
    scaler = LatentScaler(cfg.latent_scaling)
    abar = alpha_bars(cfg.schedule.num_timesteps, cfg.schedule.kind)
    rows = torch.arange(len(images))
    model.train()

    def step(k: int, encode_now: bool) -> tuple[float, float]:
        """One optimiser step as in training.train; returns (total s, encode s)."""
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(k)
        views = torch.randint(0, cache.latents.shape[1], (len(rows),), generator=gen)
        if encode_now:
            with torch.no_grad():
                raw = autoencoder.encode(pixels).float()
        else:
            raw = cache.batch(rows, views)
        encoded = time.perf_counter()
        z0 = scaler.normalize(raw)
        t = torch.randint(0, cfg.schedule.num_timesteps, (len(rows),), generator=gen)
        patch = sample_patch_size(tc.patch_sizes, tc.patch_probs, gen)
        noisy = corrupt(z0, t, abar, patch, tc.mask_ratio_max, tc.shuffle_ratio_max, gen)
        eps = model(noisy.z_t, t)
        loss = F.mse_loss(eps.float(), noisy.target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for key, value in model.state_dict().items():
                    if value.dtype.is_floating_point:
                        ema[key].lerp_(value.float(), 1 - tc.ema_decay)
        return time.perf_counter() - started, encoded - started

    times: dict[str, list[float]] = {"cached": [], "encode": []}
    encode_part: list[float] = []
    for k in range(args.warmup + args.steps):
        for mode in ("cached", "encode"):
            total, enc = step(k, mode == "encode")
            label = "warm-up" if k < args.warmup else "timed"
            print(f"  step {k + 1} {mode:>6}: {total:6.2f} s ({label})", flush=True)
            if k >= args.warmup:
                times[mode].append(total)
                if mode == "encode":
                    encode_part.append(enc)

    med = {mode: statistics.median(v) for mode, v in times.items()}
    best = {mode: min(v) for mode, v in times.items()}
    rate = {mode: args.batch_size / med[mode] for mode in med}
    ratio = rate["cached"] / rate["encode"]
    ratio_best = best["encode"] / best["cached"]
    per_image = args.views * channels * side * side * 2
    counts = [int(c) for c in args.cache_images.split(",") if c.strip()]

    print()
    print(f"| mode              | s/step (median of {args.steps}) | images/s (median) | s/step (fastest) | images/s (fastest) |")
    print("|---|---:|---:|---:|---:|")
    for mode, name in (("cached", "cached latents   "), ("encode", "encode every step")):
        print(f"| {name} | {med[mode]:.2f} | {rate[mode]:.2f} | {best[mode]:.2f} | {args.batch_size / best[mode]:.2f} |")
    print(f"cached / encode-every-step: {ratio:.2f}x faster by median step, {ratio_best:.2f}x by fastest step; "
          f"the encoder took a median {statistics.median(encode_part):.2f} s of each encode step")
    print()
    print(f"latent cache: float16, {args.views} views x {channels} x {side} x {side} = {human(per_image)} per image "
          f"(bytes = N * {args.views} * {channels} * {side} * {side} * 2)")
    print("| images | cache | where (decodiff fit) |")
    print("|---:|---:|---|")
    for n in counts:
        where = "RAM" if n * per_image <= RAM_LIMIT_BYTES else "disk, memory-mapped"
        print(f"| {n} | {human(n * per_image)} | {where} |")
    assert cache.nbytes == len(images) * per_image  # the formula is the cache's own size

    summary = {
        "benchmark": "train_speed",
        "autoencoder": args.autoencoder,
        "model_size": args.model_size,
        "parameters": count_parameters(model),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "threads": torch.get_num_threads(),
        "timed_steps": args.steps,
        "cached_images_per_s": round(rate["cached"], 3),
        "encode_every_step_images_per_s": round(rate["encode"], 3),
        "speedup": round(ratio, 3),
        "speedup_fastest_steps": round(ratio_best, 3),
        "encoder_s_per_step": round(statistics.median(encode_part), 3),
        "cache_encode_s_per_image": round(cache_s / len(images), 3),
        "cache_bytes_per_image": per_image,
        "cache_bytes": {str(n): n * per_image for n in counts},
        "note": "shared CPU: timings are noisy",
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
