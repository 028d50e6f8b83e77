"""Subtracting each map's own floor: every map minus its q-th percentile (clipped at 0),
for a few q, against the maps as they are. The pixel metrics, with AUPRO per defect type.

Why try it: pixel AUROC, AP and AUPRO threshold all test images at once, and an image
whose map sits higher everywhere (other light, other grain) spends the shared threshold
on its background. Removing the floor gives small defects a fairer threshold; regions
that are barely above their own surroundings lose by it. The image score is not touched.

    python benchmarks/map_floor.py BUNDLE_OR_MAPS_DIR CATEGORY_DIR PROTOCOL
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from _common import protocol_maps
from decodiff_cli.benchmark import _protocol_mask, discover
from decodiff_cli.metrics import pixel_metrics

PERCENTILES = (1, 10, 25, 50)
KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


def minus_floor(maps: np.ndarray, q: float) -> np.ndarray:
    floor = np.percentile(maps.reshape(len(maps), -1), q, axis=1)
    return np.clip(maps - floor[:, None, None], 0, None)


def main() -> None:
    source, category_dir, protocol = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    category = discover(category_dir)[0]
    samples = category.samples
    masks = np.stack([_protocol_mask(s, protocol) for s in samples]) > 0
    maps = np.stack(list(protocol_maps(source, category, protocol, samples)))
    kinds, normal = np.array([s.defect for s in samples]), np.array([s.label == 0 for s in samples])
    types = sorted(set(kinds[~normal]))
    print(f"{'map':14s}" + "".join(f"{k:>12s}" for k in KEYS) + "".join(f"{t[:10]:>11s}" for t in types))
    for name, m in [("as it is", maps), *((f"minus p{q}", minus_floor(maps, q)) for q in PERCENTILES)]:
        values = pixel_metrics(m, masks).values
        per_type = [pixel_metrics(m[(kinds == t) | normal], masks[(kinds == t) | normal]).values["pixel_aupro"] for t in types]
        print(f"{name:14s}" + "".join(f"{values[k]:12.3f}" for k in KEYS) + "".join(f"{v:11.3f}" for v in per_type), flush=True)


if __name__ == "__main__":
    main()
