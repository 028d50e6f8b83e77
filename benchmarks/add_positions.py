"""One-off: a copy of a bundle with the novelty term's per-position statistics, from its
training images' latents (ZTRAIN.pt, the model's encode of train/good at the bundle's shape).
args: BUNDLE ZTRAIN.pt OUT"""
import json, shutil, sys
from pathlib import Path
import torch
from decodiff_cli import bundle as B
from decodiff_cli.fitting import REFERENCE_IMAGES
from decodiff_cli.novelty import position_scale, position_statistics

src, ztr_path, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
shutil.rmtree(out, ignore_errors=True)
shutil.copytree(src, out)
cfg = json.loads((out / "config.json").read_text())
name = cfg["categories"][0] if cfg.get("categories") else None
ztr = torch.load(ztr_path)
n = len(ztr)
stats = position_statistics(lambda ids: ztr[ids], torch.arange(n))
rows = torch.linspace(0, n - 1, min(n, REFERENCE_IMAGES)).round().long().unique()
unit = position_scale(ztr[rows], stats, n)
banks = B.load_state(out / B.NORMAL_LATENTS)
names = list(banks)
assert len(names) == 1, names
banks[f"{names[0]}/positions"] = stats
B._save_tensors(out / B.NORMAL_LATENTS, {k: v.half() for k, v in banks.items()})
scales = cfg["measured"]["novelty_scales"]
old = scales[names[0]]
scales[names[0]] = (old if isinstance(old, list) else [old]) + [round(unit, 6)]
cfg["anomaly_map"]["novelty_positions"] = True
(out / "config.json").write_text(json.dumps(cfg, indent=2))
B._write_checksums(out)
print(out, "units", scales[names[0]])
