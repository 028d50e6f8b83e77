"""Fit with settings that are not fit options, for ablations: the `cpu` preset and a time
budget, then fit options and `section.field` overrides of ModelConfig given as JSON.

    python benchmarks/fit_variant.py DATA OUT MINUTES '{"denoiser.attention": [true, true, true]}'
    python benchmarks/fit_variant.py DATA OUT MINUTES '{"options": {"model_size": "s"}}'

The autoencoder is TAEF2 from ../shared/weights/taef2 unless the options name another.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from decodiff_cli.fitting import fit
from decodiff_cli.inputs import find_training_images
from decodiff_cli.presets import build_config

TAEF2 = Path(__file__).resolve().parents[2] / "shared" / "weights" / "taef2"


def main() -> None:
    data, out, minutes, overrides = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
    options = {"autoencoder": str(TAEF2), "time_budget": minutes, **overrides.pop("options", {})}
    cfg = build_config("cpu", options)
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        setattr(getattr(cfg, section), name, value)
    images, _ = find_training_images([data])

    def report(kind: str, info: dict) -> None:
        if kind not in ("encode", "step"):
            print(kind, {key: value for key, value in info.items() if key != "skipped"}, flush=True)

    result = fit(images, out, cfg, on_event=report)
    print("steps", result.steps, "seconds", round(result.seconds, 1))


if __name__ == "__main__":
    main()
