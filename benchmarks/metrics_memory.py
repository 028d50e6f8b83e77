"""Peak memory and time of the pixel metrics on VisA-sized data (random maps and masks).

    /usr/bin/time -v python benchmarks/metrics_memory.py --images 2000 --size 256
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from decodiff_cli.metrics import compute_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    maps = rng.random((args.images, args.size, args.size), dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    for i in range(0, args.images, 2):  # every other image has a square defect
        y, x = rng.integers(0, args.size - 32, 2)
        masks[i, y : y + 32, x : x + 32] = True
        maps[i, y : y + 32, x : x + 32] += 0.5
    began = time.perf_counter()
    result = compute_metrics(maps.reshape(len(maps), -1).max(1), masks.any(axis=(1, 2)), maps, masks)
    seconds = time.perf_counter() - began
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print({k: round(v, 4) for k, v in result.values.items()})
    print(f"{args.images} maps of {args.size}x{args.size}: {seconds:.1f} s, peak RSS {peak_mib:.0f} MiB "
          f"(inputs {(maps.nbytes + masks.nbytes) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
