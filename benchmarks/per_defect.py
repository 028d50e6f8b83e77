"""Image AUROC per defect type, for the default (arithmetic, no reference) map of the
tensors cached by map_variants.py: each defect type against the good test images.

    python benchmarks/per_defect.py CATEGORY_DIR CACHE.pt
"""

from __future__ import annotations

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
    for kind in sorted(set(kinds) - {"good"}):
        rows = (kinds == kind) | (kinds == "good")
        print(f"{kind:16s} {int((kinds == kind).sum()):4d} images  image AUROC {roc_auc_score(kinds[rows] != 'good', scores[rows]):.3f}")


if __name__ == "__main__":
    main()
