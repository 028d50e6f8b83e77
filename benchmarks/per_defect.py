"""Image AUROC per defect type, for the arithmetic (no reference, no feature term) map of
the tensors cached by map_variants.py, beside the trivial baseline's score on the same
latents (max over positions of |z0 - mean normal z0|, mean over channels; the normal
latents are the cache's training images): each defect type against the good test images.
With a third argument, also the image scores of a bundle, as `decodiff score --format csv`
wrote them for the category's test folder.

    python benchmarks/per_defect.py CATEGORY_DIR CACHE.pt [SCORES.csv]
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from decodiff_cli.anomaly_map import latent_discrepancy
from decodiff_cli.benchmark import discover


def main() -> None:
    category_dir, cache = Path(sys.argv[1]), sys.argv[2]
    saved = torch.load(cache)
    samples = discover(category_dir)[0].samples
    kinds = np.array([s.image.parent.name for s in samples])
    size = tuple(saved["pixel"].shape[-2:])
    maps = (latent_discrepancy(saved["z0_hat"], saved["z0"], 0.5, 1.0, size) + saved["pixel"]) / 2
    scores = maps.flatten(1).amax(dim=1).numpy()
    baseline = (saved["z0"] - saved["nz0"].mean(dim=0, keepdim=True)).abs().mean(dim=1).flatten(1).amax(dim=1).numpy()
    columns = {"decodiff (cache)": scores, "trivial baseline": baseline}
    if len(sys.argv) > 3:
        by_path = {Path(row["path"]).resolve(): float(row["score"]) for row in csv.DictReader(open(sys.argv[3]))}
        columns[Path(sys.argv[3]).name] = np.array([by_path[s.image.resolve()] for s in samples])
    print(f"{'defect':16s} {'images':>6s}  image AUROC: " + "  ".join(columns))
    for kind in sorted(set(kinds) - {"good"}):
        rows = (kinds == kind) | (kinds == "good")
        truth = kinds[rows] != "good"
        print(f"{kind:16s} {int((kinds == kind).sum()):6d}  " + "  ".join(f"{roc_auc_score(truth, c[rows]):.3f}" for c in columns.values()))


if __name__ == "__main__":
    main()
