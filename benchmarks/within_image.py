"""Does a map rank a defect above the rest of its own image? Per defect type, over the
anomalous test images of one MVTec-layout category: the median within-image pixel AUROC
(the image's labelled pixels against its other pixels), the share of images where it is
below 0.5 (the map is higher outside the label than inside), and the median ratio of the
map's mean inside the label to its mean outside.

AUPRO thresholds all images at once, so a type whose regions are not even above their own
surroundings cannot be covered at a low false-positive rate. The maps are the same as
`decodiff benchmark` scores: a bundle's (its own geometry brought to the protocol's), or
stored ones (`--maps` layout, e.g. from examples/mean_latent_baseline.py).

    python benchmarks/within_image.py BUNDLE_OR_MAPS_DIR CATEGORY_DIR PROTOCOL
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from _common import protocol_maps
from decodiff_cli.benchmark import _protocol_mask, discover


def main() -> None:
    source, category_dir, protocol = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    category = discover(category_dir)[0]
    samples = [s for s in category.samples if s.label == 1]
    maps = protocol_maps(source, category, protocol, samples)
    rows: dict[str, list[tuple[float, float]]] = {}
    for s, a in zip(samples, maps):
        a, inside = np.asarray(a, dtype=np.float64).squeeze(), _protocol_mask(s, protocol) > 0
        if inside.all() or not inside.any():  # nothing to rank against
            continue
        ratio = a[inside].mean() / max(a[~inside].mean(), 1e-12)
        rows.setdefault(s.defect, []).append((roc_auc_score(inside.ravel(), a.ravel()), ratio))
    print(f"{'defect':12s} {'images':>6s} {'median AUROC':>12s} {'share < 0.5':>11s} {'inside/outside':>14s}")
    for kind, values in sorted(rows.items()):
        auroc, ratio = np.array(values).T
        print(f"{kind:12s} {len(values):6d} {np.median(auroc):12.3f} {np.mean(auroc < 0.5):11.2f} {np.median(ratio):14.2f}")


if __name__ == "__main__":
    main()
