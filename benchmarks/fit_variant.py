"""Fit with settings that are not fit options (for ablations): the cpu preset, TAEF2, a
time budget, then any `section.field` overrides of ModelConfig as JSON.

    python benchmarks/fit_variant.py DATA OUT MINUTES '{"denoiser.attention": [true, true, true]}'
    python benchmarks/fit_variant.py DATA OUT MINUTES '{"options": {"model_size": "s"}}'
"""
import sys, json
from pathlib import Path
from decodiff_cli.presets import build_config
from decodiff_cli.fitting import fit
from decodiff_cli.inputs import find_training_images
data, out, minutes, patch = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
cfg = build_config("cpu", {"autoencoder": "/work/shared/weights/taef2", "time_budget": minutes, **patch.pop("options", {})})
for dotted, value in patch.items():
    section, name = dotted.split(".")
    setattr(getattr(cfg, section), name, value)
images, _ = find_training_images([data])
r = fit(images, out, cfg, on_event=lambda k, i: print(k, {a: b for a, b in i.items() if a != "skipped"}) if k not in ("encode", "step") else None)
print("steps", r.steps, "seconds", r.seconds)
