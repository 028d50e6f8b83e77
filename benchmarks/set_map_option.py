"""Copy a bundle with some of its map options changed, to measure a scoring-side option on
the same weights (options that need fit-time statistics, such as the feature term, need
their own script: add_map_term.py). The thresholds are copied as they are: they were
calibrated for the old map; recalibrate with `decodiff calibrate` before using them.

    python benchmarks/set_map_option.py OLD_BUNDLE NEW_BUNDLE shifted_view=true [KEY=JSON ...]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from decodiff_cli.bundle import (AUTOENCODER, DENOISER, TRAINING_LOG, load_networks, load_normal_latents, load_state,
                                 read_bundle, write_bundle)


def main() -> None:
    old, new = Path(sys.argv[1]), Path(sys.argv[2])
    bundle = read_bundle(old)
    changes = {key: json.loads(value) for key, value in (a.split("=", 1) for a in sys.argv[3:])}
    cfg = bundle.config
    cfg.anomaly_map = dataclasses.replace(cfg.anomaly_map, **changes)
    _, _, reference = load_networks(bundle)
    autoencoder = load_state(old / AUTOENCODER) if (old / AUTOENCODER).is_file() else {}
    write_bundle(new, cfg, load_state(old / DENOISER), autoencoder, bundle.calibration, old / TRAINING_LOG, reference=reference,
                 normal_latents=load_normal_latents(bundle))
    print(f"wrote {new} with {changes}")


if __name__ == "__main__":
    main()
