"""Where the per-position view's excess lies (one-off, issue 20). args: CACHE DATA, where CACHE is
what position_view_probe.py recorded (the tiles, --protocol full)."""
import sys, pathlib
import numpy as np
import torch
from torch.nn import functional as F
from PIL import Image
from decodiff_cli.datasets import discover
cache = torch.load(sys.argv[1], weights_only=False)
samples = discover(pathlib.Path(sys.argv[2]))[0].samples
D = torch.cat([x.novelty for x in cache])

e = (D[:, -1] - 1).clamp(0, 1)  # the view's excess, clip 2
h, wd = D.shape[-2:]
stats = {}
for i, s in enumerate(samples):
    if s.mask is None:
        stats.setdefault("good", []).append((float(e[i].sum()), 0, 0, 0)); continue
    m = torch.from_numpy(np.array(Image.open(s.mask).convert("L")) > 127).float()[None, None]
    m = (F.interpolate(m, size=(h, wd), mode="area")[0, 0] > 0).float()  # latent pixels the label touches
    d1 = F.max_pool2d(m[None, None], 3, 1, 1)[0, 0]
    d3 = F.max_pool2d(m[None, None], 7, 1, 3)[0, 0]
    ins = float((e[i] * m).sum()); r1 = float((e[i] * (d1 - m)).sum()); r3 = float((e[i] * (d3 - d1)).sum()); far = float((e[i] * (1 - d3)).sum())
    stats.setdefault(s.defect, []).append((ins, r1, r3, far, float(m.sum())))
for k, v in stats.items():
    a = np.array(v)
    print(k, len(v), "mean per image: excess inside / 1 px around / 2-3 px around / farther; label size", np.round(a.mean(0), 2))

# where the excess lies on good tiles
good = torch.tensor([s.defect == "good" for s in samples])
eg = e[good]
print("good images:", int(good.sum()), "fraction of positions with e>0:", float((eg > 0).float().mean()))
m = (eg > 0).float().mean(0)
print("per-row fraction (32 rows):", np.round(m.mean(1).numpy(), 3))
print("per-col fraction:", np.round(m.mean(0).numpy(), 3))
print("border 2px fraction", float(m[[0,1,30,31]].mean()), float(m[:, [0,1,30,31]].mean()), "interior", float(m[2:30, 2:30].mean()))
# e magnitude distribution where >0
v = eg[eg > 0]
print("e>0 quantiles", [round(float(torch.quantile(v, q)), 3) for q in (.5, .9, .99)])
# window term at those sites vs elsewhere
w = D[good, 0]
print("window distance at e>0 sites median", float(w[eg > 0].median()), "elsewhere", float(w[eg == 0].median()))
