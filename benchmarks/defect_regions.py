"""How the ground truth of one MVTec-layout category divides into AUPRO's regions: per
defect type, the number of 8-connected regions and their median area as a share of the
image, in the protocol's geometry. AUPRO averages over regions, so the kinds with many
regions weigh most; `decodiff benchmark --per-defect` gives each kind's own AUPRO.

    python benchmarks/defect_regions.py CATEGORY_DIR PROTOCOL
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from decodiff_cli.benchmark import _protocol_mask, discover
from decodiff_cli.metrics import _label_regions


def main() -> None:
    category_dir, protocol = Path(sys.argv[1]), sys.argv[2]
    samples = [s for s in discover(category_dir)[0].samples if s.label == 1]
    print(f"{'defect':16s} {'images':>6s} {'regions':>7s} {'median area':>11s}")
    for kind in sorted({s.defect for s in samples}):
        masks = np.stack([_protocol_mask(s, protocol) for s in samples if s.defect == kind])
        regions, _ = _label_regions(masks)
        areas = np.bincount(regions.ravel())[1:] / masks[0].size
        print(f"{kind:16s} {len(masks):6d} {len(areas):7d} {100 * np.median(areas):10.2f}%")


if __name__ == "__main__":
    main()
