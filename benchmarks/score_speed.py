"""Scoring throughput on the CPU: batched versus one image at a time, memory, bf16.

    python benchmarks/score_speed.py [--bundle BUNDLE] [--full]
    python benchmarks/score_speed.py --images 16 --batch-sizes 8,16 --rss-counts 20,60   # = --full

Without ``--bundle`` a bundle with *random* weights is built in memory (and written to a
temporary folder for the memory subprocesses): the TAEF2 autoencoder from
the packaged TAEF2, an ``xs`` denoiser, latent scaling ``none``. Random weights
cost exactly what trained ones do, so no training is needed for speed; for the bf16
figures a trained bundle is the meaningful input.

What it measures, on the bottle test images (``../shared/data/mvtec_bottle/bottle/test``;
skipped with a message when absent), all on already-preprocessed tensors so image
decoding is not counted:

1. batched scoring (``DecoDiffModel.infer``) at each ``--batch-sizes``: images/s and the
   seconds per image of each stage (encode / denoiser / decode / map, from
   ``Inference.timings``);
2. one-by-one fp32 scoring of the same images, and the batched / one-by-one ratio;
3. peak RSS of a fresh process that scores ``--rss-counts`` images through
   ``Detector.predict`` (streaming, results dropped): memory should stay flat in N;
4. bf16 autocast versus fp32 on the same images: max |difference| of image scores and
   of maps.

The CPU is shared with other processes: timings are noisy, so treat the ratios as the
figures to compare and rerun before quoting absolute images/s. ``--threads auto`` (the
default) uses one torch thread when the CPU is already busy: on an oversubscribed CPU
OpenMP threads wait on each other at every op, and we saw steps take up to 10x longer
with 2 threads than with 1. The default run is sized
to stay near 3 minutes on 2 busy cores; ``--full`` is the issue's configuration (16
images, batch 8 and 16, RSS for 20 vs 60 images), about 3x as long.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import choose_threads  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BOTTLE = SHARED / "data" / "mvtec_bottle" / "bottle"
DEFAULT_AE = "taef2"  # packaged with decodiff
CATEGORY = "bottle"


def test_images(count: int) -> list[Path]:
    """``count`` bottle test images spread evenly over the defect folders (cycled if more)."""
    paths = sorted(p for p in (BOTTLE / "test").glob("*/*.png"))
    if count <= len(paths):
        picks = np.linspace(0, len(paths) - 1, count).round().astype(int)
        return [paths[i] for i in picks]
    return [paths[i % len(paths)] for i in range(count)]


def build_random_bundle(folder: Path, autoencoder_spec: str, size: str) -> Path:
    """A loadable bundle with random denoiser weights (seed 0) and the real TAEF2."""
    from decodiff_cli.autoencoders import describe, load_autoencoder
    from decodiff_cli.bundle import write_bundle
    from decodiff_cli.calibration import make_calibration
    from decodiff_cli.config import DenoiserConfig, LatentScaling, ModelConfig
    from decodiff_cli.denoiser import Denoiser

    autoencoder = load_autoencoder(autoencoder_spec)
    cfg = ModelConfig(latent_scaling=LatentScaling(kind="none"), categories=[CATEGORY])
    cfg.autoencoder = describe(autoencoder, autoencoder_spec)
    side = cfg.preprocess.image_size // autoencoder.downsample
    cfg.denoiser = DenoiserConfig(size=size, latent_channels=autoencoder.latent_channels, latent_size=side)
    torch.manual_seed(0)
    denoiser = Denoiser(cfg.denoiser)
    # Placeholder thresholds: Detector.predict needs some; the scores are not judged here.
    calibration = make_calibration({CATEGORY: {"image_threshold": 1.0, "pixel_threshold": 0.5, "rule": "placeholder"}})
    return write_bundle(folder / "random-bundle", cfg, denoiser.state_dict(), autoencoder.state_dict(), calibration)


def _status_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_child(bundle: str, count: int, batch_size: int, threads: int) -> None:
    """Subprocess body: stream ``count`` images through Detector.predict, report peak RSS.

    The peak is VmHWM, the high-water mark of this process's own memory. (getrusage's
    ru_maxrss is not used when /proc exists: Linux carries it across fork + exec, so a
    child started by a big parent reports the parent's size.) After loading, the mark is
    reset (/proc/self/clear_refs), so "scoring peak" is what scoring itself needs.
    """
    from decodiff_cli.detector import Detector

    torch.set_num_threads(threads)
    detector = Detector.load(bundle, device="cpu", batch_size=batch_size)
    loaded = _status_kib("VmRSS")
    load_peak = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to now
        reset = True
    except OSError:
        reset = False
    paths = test_images(count)
    category = detector.categories[0]
    scores = [p.score for p in detector.predict(paths, category=category)]  # results dropped
    peak = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"images": len(scores), "after_load_kib": loaded, "load_peak_kib": load_peak,
                      "scoring_peak_kib": peak if reset else None, "peak_rss_kib": max(peak, load_peak),
                      "final_rss_kib": _status_kib("VmRSS")}))


def run_rss(bundle: Path, count: int, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(bundle), str(count), str(batch_size), str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        raise RuntimeError(f"RSS subprocess for {count} images failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed_infer(model, tensors: torch.Tensor, batch_size: int) -> tuple[float, dict[str, float], torch.Tensor, torch.Tensor]:
    """Score all tensors in batches: (wall s, stage s summed, scores, maps)."""
    stages: dict[str, float] = {}
    scores, maps = [], []
    started = time.perf_counter()
    for start in range(0, len(tensors), batch_size):
        out = model.infer(tensors[start : start + batch_size])
        for key, value in out.timings.items():
            stages[key] = stages.get(key, 0.0) + value
        scores.append(out.scores)
        maps.append(out.maps)
    return time.perf_counter() - started, stages, torch.cat(scores), torch.cat(maps)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a trained bundle (default: random weights, built here)")
    parser.add_argument("--autoencoder", default=DEFAULT_AE, help="for the random bundle")
    parser.add_argument("--model-size", default="xs", help="denoiser size of the random bundle")
    parser.add_argument("--images", type=int, default=8, help="test images to time (default 8; --full: 16)")
    parser.add_argument("--batch-sizes", default="8", help="comma-separated (default 8; --full: 8,16)")
    parser.add_argument("--rss-counts", default="4,12", help="image counts for the RSS check (--full: 20,60)")
    parser.add_argument("--rss-batch-size", type=int, default=4, help="batch size in the RSS subprocesses (--full: 8)")
    parser.add_argument("--bf16-images", type=int, default=0, help="images for bf16 vs fp32 (0: all --images)")
    parser.add_argument("--full", action="store_true", help="the issue's sizes: 16 images, batch 8,16, RSS 20 vs 60")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--threads", default="auto",
                        help="torch threads; auto (default): 1 when the CPU is already busy, else torch's default")
    args = parser.parse_args(argv)
    if args.full:
        args.images, args.batch_sizes, args.rss_counts, args.rss_batch_size = 16, "8,16", "20,60", 8
    threads_why = choose_threads(args.threads)

    if not (BOTTLE / "test").is_dir():
        print(f"skipped: the bottle test images ({BOTTLE / 'test'}) are not here")
        return 0
    if args.bundle is None and not Path(args.autoencoder).is_dir() and args.autoencoder != "pixel":
        print(f"skipped: no autoencoder folder {args.autoencoder} for the random-weight bundle")
        return 0

    from decodiff_cli.detector import Detector
    from decodiff_cli.images import load_image

    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    rss_counts = [int(c) for c in args.rss_counts.split(",") if c.strip()]
    workdir = tempfile.TemporaryDirectory(prefix="decodiff-score-speed-")
    if args.bundle is not None:
        bundle, kind = args.bundle, f"bundle {args.bundle}"
    else:
        bundle = build_random_bundle(Path(workdir.name), args.autoencoder, args.model_size)
        kind = f"random-weight bundle (TAEF2 + {args.model_size} denoiser, latent scaling none)"
    detector = Detector.load(bundle, device="cpu", dtype="fp32")
    model = detector.model
    cfg = model.cfg
    paths = test_images(args.images)
    tensors = torch.stack([load_image(p, cfg.preprocess).tensor for p in paths])
    print(f"decodiff score speed: {kind}; {len(paths)} bottle test images at {cfg.preprocess.image_size} px; "
          f"{cfg.correction.num_calls} denoiser calls; map {cfg.anomaly_map.combine}; CPU, "
          f"{torch.get_num_threads()} torch threads ({threads_why})")
    print("NOTE: the CPU is shared with other processes: timings are noisy; compare ratios, rerun before quoting.")

    model.infer(tensors[:1])  # warm-up: allocation and kernel selection, not timed
    rows: list[tuple[str, float, dict[str, float]]] = []
    results: dict[str, dict] = {}
    fp32_ref = None
    for bs in batch_sizes:
        if bs > len(tensors):
            print(f"  batch {bs}: skipped (only {len(tensors)} images; use --images {bs} or more)")
            continue
        wall, stages, scores, maps = timed_infer(model, tensors, bs)
        rows.append((f"batched fp32, batch {bs}", wall, stages))
        if fp32_ref is None:
            fp32_ref = (bs, scores, maps)
        print(f"  batch {bs}: {len(tensors) / wall:.3f} images/s", flush=True)
    wall1, stages1, scores1, maps1 = timed_infer(model, tensors, 1)
    rows.append(("one-by-one fp32, batch 1", wall1, stages1))
    print(f"  one-by-one: {len(tensors) / wall1:.3f} images/s", flush=True)
    if fp32_ref is None:
        fp32_ref = (1, scores1, maps1)

    n = len(tensors)
    print()
    print("| run | images/s | s/image | encode | denoiser | decode | map |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, wall, stages in rows:
        cells = " | ".join(f"{stages.get(k, 0.0) / n:.3f}" for k in ("encode", "denoiser", "decode", "map"))
        print(f"| {name} | {n / wall:.3f} | {wall / n:.3f} | {cells} |")
        results[name] = {"images_per_s": round(n / wall, 4),
                         "seconds_per_image": {k: round(v / n, 4) for k, v in stages.items()}}
    single_rate = n / wall1
    speedups = {name: (n / wall) / single_rate for name, wall, _ in rows if not name.startswith("one-by-one")}
    for name, value in speedups.items():
        verdict = "meets" if value >= 3 else "below"
        print(f"speed-up {name} vs one-by-one: {value:.2f}x ({verdict} the 3x target)")
    # Same images, same weights: batching must not change the numbers beyond float noise.
    same = float((fp32_ref[1] - scores1).abs().max())
    print(f"batched vs one-by-one fp32: max |score difference| {same:.2e}")

    # bf16 vs fp32
    m = args.bf16_images or n
    bs_ref, ref_scores, ref_maps = fp32_ref
    bf16 = Detector.load(bundle, device="cpu", dtype="bf16").model
    bf16.infer(tensors[:1])
    wall16, stages16, scores16, maps16 = timed_infer(bf16, tensors[:m], bs_ref)
    score_diff = float((scores16 - ref_scores[:m]).abs().max())
    map_diff = float((maps16 - ref_maps[:m]).abs().max())
    map_mean = float((maps16 - ref_maps[:m]).abs().mean())
    print(f"bf16 vs fp32 (batch {bs_ref}, {m} images): max |score diff| {score_diff:.4f} "
          f"(fp32 scores {float(ref_scores[:m].min()):.4f}..{float(ref_scores[:m].max()):.4f}); "
          f"max |map diff| {map_diff:.4f}, mean |map diff| {map_mean:.5f}; "
          f"bf16 {m / wall16:.3f} images/s vs fp32 {n / next(w for k, w, _ in rows if k.endswith(f'batch {bs_ref}')):.3f}")

    rss = {}
    if not args.skip_rss:
        for count in rss_counts:
            rss[count] = run_rss(bundle, count, args.rss_batch_size)
            r = rss[count]
            mib = lambda kib: "n/a" if kib is None else f"{kib / 1024:.0f} MiB"  # noqa: E731
            print(f"  RSS {count} images: peak {mib(r['peak_rss_kib'])} (after load {mib(r['after_load_kib'])}, "
                  f"peak while scoring {mib(r['scoring_peak_kib'])}, at the end {mib(r['final_rss_kib'])})", flush=True)
        low, high = min(rss_counts), max(rss_counts)
        growth = (rss[high]["peak_rss_kib"] - rss[low]["peak_rss_kib"]) / 1024
        print(f"peak RSS, Detector.predict streaming at batch {args.rss_batch_size}: {low} images "
              f"{rss[low]['peak_rss_kib'] / 1024:.0f} MiB, {high} images {rss[high]['peak_rss_kib'] / 1024:.0f} MiB "
              f"({growth:+.0f} MiB for {high - low} more images; flat = within a few tens of MiB)")

    summary = {
        "benchmark": "score_speed",
        "bundle": "random" if args.bundle is None else str(args.bundle),
        "images": n,
        "threads": torch.get_num_threads(),
        "denoiser_calls": cfg.correction.num_calls,
        "runs": results,
        "speedup_vs_one_by_one": {k: round(v, 3) for k, v in speedups.items()},
        "bf16": {"images": m, "max_abs_score_diff": score_diff, "max_abs_map_diff": map_diff,
                 "mean_abs_map_diff": map_mean, "images_per_s": round(m / wall16, 4)},
        "peak_rss_mib": {str(k): round(v["peak_rss_kib"] / 1024, 1) for k, v in rss.items()},
        "rss_after_load_mib": {str(k): round(v["after_load_kib"] / 1024, 1) for k, v in rss.items() if v["after_load_kib"]},
        "rss_batch_size": args.rss_batch_size,
        "note": "shared CPU: timings are noisy",
    }
    print(json.dumps(summary))
    workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
