"""Does DeCo-Diff's correction repair what it sees? Diagnostics for one bundle.

    python benchmarks/correction_diagnostics.py BUNDLE DATASET_CATEGORY [--category NAME]
        [--max-test 60] [--max-train 32] [--timesteps 10] [--device cpu] [--threads 1] [--json out.json]

DATASET_CATEGORY is an MVTec-layout category folder (``train/good``, ``test/<defect>``,
``ground_truth/<defect>``). Three questions, each printed as a table:

1. **Movement.** How far does the correction move the latent, inside the ground-truth
   defects against the normal places of the same images, after each model call? Per
   defect type: the mean of ``|z0_hat - z0|`` (mean over channels, in the bundle's
   normalised latent units) inside and outside, their ratio, and the same for the decoded
   images, ``|D(z0_hat) - D(z0)|`` (mean over RGB, [-1, 1] scale) after the last call: the
   repair a user sees in ``localize``'s ``_recon.png``.
2. **Loss split.** On training latents, the model's squared error on the noised elements
   against the loss of predicting 0 there (``|eps'|^2``), and on the clean elements (where
   the target is 0), per timestep and per patch size. A ratio near 1 on noised elements
   means the model has not learnt the direction of deviation there.
3. **Shuffled patches.** The same ratio when the "noise" of every noised patch is a
   latent patch of another training image at the same place (the structured anomalies of
   training), against Gaussian noise, per timestep: does the model undo a plausible but
   wrong patch, or only noise?

The bundle holds the final weights only, so "over training" means running this on
bundles fitted for different step counts (``decodiff fit --max-steps N``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from _common import choose_threads  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from decodiff_cli.datasets import discover
from decodiff_cli.detector import Detector
from decodiff_cli.deviation import as_deviation, corrupt
from decodiff_cli.images import load_image, mask_to_model_space
from decodiff_cli.inputs import is_image_name


def _denoiser(detector: Detector, category: str):
    model = detector.model
    label = torch.tensor([detector.categories.index(category)]) if detector.class_conditional else None

    def eps_theta(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = None if label is None else label.expand(len(z_t)).to(z_t.device)
        out = model.denoiser(z_t, t, labels).float()
        return as_deviation(out, z_t.float(), t, model.abar, model.cfg.denoiser.prediction)

    return eps_theta


@torch.inference_mode()
def movement(detector: Detector, category: str, samples, max_test: int) -> dict:
    """Per defect type and per model call: mean |z0_hat - z0| inside / outside the defect."""
    model, cfg = detector.model, detector.bundle.config
    steps = cfg.correction.timesteps()
    latent = defaultdict(lambda: np.zeros((len(steps), 2)))  # defect -> (call, inside/outside sums)
    counts = defaultdict(lambda: np.zeros(2))
    pixel = defaultdict(lambda: np.zeros(2))
    pixel_counts = defaultdict(lambda: np.zeros(2))
    per_type = defaultdict(list)
    for sample in samples:
        per_type[sample.defect].append(sample)
    chosen = [s for group in per_type.values() for s in group[:max(1, max_test // len(per_type))]]
    eps_theta = _denoiser(detector, category)
    for i, sample in enumerate(chosen, 1):
        print(f"\rmovement: {i}/{len(chosen)}", end="", file=sys.stderr)
        image = load_image(sample.image, cfg.preprocess).tensor[None].to(model.device)
        mask = (torch.from_numpy(mask_to_model_space(sample.mask, cfg.preprocess)) if sample.mask
                else torch.zeros(image.shape[-2:], dtype=torch.bool))
        z0 = model.encode(image)
        # A latent position is "inside" when most of its pixels are in the defect.
        inside = F.adaptive_avg_pool2d(mask[None, None].float(), z0.shape[-2:])[0, 0] >= 0.5
        z = z0
        for k, t in enumerate(steps):  # the z_{t-1} strategy, keeping each call's z0_hat
            t_batch = torch.full((1,), t, dtype=torch.long, device=z0.device)
            eps = eps_theta(z, t_batch)
            abar = model.abar
            z0_hat = z - (1 - abar[t]).sqrt() * eps
            if k + 1 < len(steps):
                z = z0_hat + (1 - abar[steps[k + 1]]).sqrt() * eps
            moved = (z0_hat - z0).abs().mean(dim=1)[0].cpu()
            for j, where in enumerate((inside, ~inside)):
                if where.any():
                    latent[sample.defect][k, j] += moved[where].sum().item()
                    counts[sample.defect][j] += where.sum().item() if k == 0 else 0
        reconstructed, corrected, _ = model.decode_pairs(z0, z0_hat, features=False)
        diff = (corrected - reconstructed).abs().mean(dim=1)[0].float().cpu()
        for j, where in enumerate((mask, ~mask)):
            if where.any():
                pixel[sample.defect][j] += diff[where].sum().item()
                pixel_counts[sample.defect][j] += where.sum().item()
    print(file=sys.stderr)
    out = {}
    for defect in per_type:
        c, pc = counts[defect], pixel_counts[defect]
        rows = [[latent[defect][k, j] / c[j] if c[j] else float("nan") for j in (0, 1)] for k in range(len(steps))]
        px = [pixel[defect][j] / pc[j] if pc[j] else float("nan") for j in (0, 1)]
        out[defect] = {"timesteps": steps, "latent_inside_outside": rows, "pixel_inside_outside": px,
                       "pixel_ratio": px[0] / px[1] if pc[0] and px[1] else None}
    return out


@torch.inference_mode()
def loss_split(detector: Detector, category: str, z0: torch.Tensor, timesteps: list[int], seed: int = 0) -> dict:
    """Per timestep and patch size: noised-element error / |eps'|^2, and clean-element error."""
    model, train = detector.model, detector.bundle.config.train
    eps_theta = _denoiser(detector, category)
    generator = torch.Generator().manual_seed(seed)
    by_t, by_patch = {}, {}
    for t in timesteps:
        t_batch = torch.full((len(z0),), t, device=z0.device)
        for patch in train.patch_sizes:
            c = corrupt(z0, t_batch, model.abar, patch, train.mask_ratio_max,
                        train.shuffle_ratio_max, generator=generator)
            err = (eps_theta(c.z_t, t_batch) - c.target) ** 2
            noised = (1 - c.kept).expand_as(err).bool()
            row = [err[noised].sum().item(), (c.target[noised] ** 2).sum().item(), noised.sum().item(),
                   err[~noised].sum().item(), (~noised).sum().item()]
            for table, key in ((by_t, t), (by_patch, patch)):
                table[key] = [a + b for a, b in zip(table.get(key, [0.0] * 5), row)]

    def summary(row):
        err_n, zero_n, n_n, err_c, n_c = row
        return {"noised_error_over_zero": err_n / zero_n if zero_n else None,
                "noised_mse": err_n / n_n if n_n else None, "clean_mse": err_c / n_c if n_c else None}

    return {"by_timestep": {t: summary(r) for t, r in by_t.items()},
            "by_patch_size": {p: summary(r) for p, r in by_patch.items()}}


@torch.inference_mode()
def shuffled_patches(detector: Detector, category: str, z0: torch.Tensor, timesteps: list[int],
                     seed: int = 0) -> dict:
    """Per timestep: error / |eps'|^2 on noised patches whose noise is another image's patch
    at the same place, against Gaussian noise (the same masks)."""
    model, train = detector.model, detector.bundle.config.train
    eps_theta = _denoiser(detector, category)
    generator = torch.Generator().manual_seed(seed)
    patch = max(train.patch_sizes)  # whole patches of another image: the most plausible kind
    other = z0.roll(1, dims=0)
    out = {}
    for t in timesteps:
        t_batch = torch.full((len(z0),), t, device=z0.device)
        c = corrupt(z0, t_batch, model.abar, patch, train.mask_ratio_max, 0.0, generator=generator)
        a = model.abar[t]
        row = {}
        for name, noise in (("gaussian", None), ("shuffled", other)):
            if noise is None:
                z_t, target = c.z_t, c.target
            else:  # method.md 3.5-3.6 with n = the other image's latent
                z_t = c.kept * z0 + (1 - c.kept) * (a.sqrt() * z0 + (1 - a).sqrt() * noise)
                target = (1 - c.kept) * (noise - (1 - a.sqrt()) / (1 - a).sqrt() * z0)
            noised = (1 - c.kept).expand_as(z0).bool()
            err = (eps_theta(z_t, t_batch) - target)[noised].pow(2).sum()
            row[name] = (err / target[noised].pow(2).sum()).item()
        out[t] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("dataset", type=Path, help="an MVTec-layout category folder")
    parser.add_argument("--category", help="the bundle's class to use (default: the folder's name, or its only class)")
    parser.add_argument("--max-test", type=int, default=60, help="test images, spread evenly over the defect types")
    parser.add_argument("--max-train", type=int, default=32, help="training latents for the loss tables")
    parser.add_argument("--timesteps", type=int, default=10,
                        help="timesteps for the loss tables, evenly spaced from 0 (0: every one)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (the model's device)")
    parser.add_argument("--threads", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"threads: {choose_threads(args.threads)}", file=sys.stderr)

    detector = Detector.load(args.bundle, device=args.device)
    category = args.category or (detector.categories[0] if len(detector.categories) == 1 else args.dataset.name)
    detector.check_category(category)
    (found,) = discover(args.dataset)
    train_paths = sorted(p for p in (args.dataset / "train" / "good").iterdir() if is_image_name(p))[: args.max_train]
    cfg = detector.bundle.config
    images = torch.stack([load_image(p, cfg.preprocess).tensor for p in train_paths])
    z0 = torch.cat([detector.model.encode(batch.to(detector.model.device)) for batch in images.split(8)])
    total = len(detector.model.abar)
    timesteps = (list(range(total)) if not args.timesteps or args.timesteps >= total
                 else sorted({round(i * (total - 1) / (args.timesteps - 1)) for i in range(args.timesteps)}))

    report = {"movement": movement(detector, category, found.samples, args.max_test),
              "loss_split": loss_split(detector, category, z0, timesteps),
              "shuffled_patches": shuffled_patches(detector, category, z0, timesteps)}

    print("\n1. Movement |z0_hat - z0| inside / outside the defects, after each call (t)")
    for defect, row in report["movement"].items():
        calls = "  ".join(f"t={t}: {i:.3f}/{o:.3f}" for t, (i, o) in zip(row["timesteps"], row["latent_inside_outside"]))
        ratio = "n/a" if row["pixel_ratio"] is None else f"{row['pixel_ratio']:.2f}x"
        i, o = row["pixel_inside_outside"]
        print(f"  {defect:14s} {calls}   decoded: {i:.4f}/{o:.4f} = {ratio}")
    print("\n2. Loss split on training latents: noised error / |eps'|^2, noised MSE, clean MSE")
    for title, table in (("t", report["loss_split"]["by_timestep"]), ("patch", report["loss_split"]["by_patch_size"])):
        for key, s in table.items():
            print(f"  {title}={key:<3} {s['noised_error_over_zero']:.3f}  {s['noised_mse']:.4f}  {s['clean_mse']:.4f}")
    print("\n3. Error / |eps'|^2 on noised patches: Gaussian noise vs another image's patch")
    for t, row in report["shuffled_patches"].items():
        print(f"  t={t}  gaussian {row['gaussian']:.3f}  shuffled {row['shuffled']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
