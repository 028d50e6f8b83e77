"""One-off ablation (issue 20): pixel AP on one defect type (+ good images) of novelty-term variants from a two-window bank (novelty_windows_ablation.py ... 3,1).

    python benchmarks/novelty_window_terms.py BUNDLE DATA DEFECT
"""
import sys
import numpy as np, torch
from torch.nn import functional as F
from sklearn.metrics import average_precision_score
from decodiff_cli.datasets import discover
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image, mask_to_model_space
from decodiff_cli.anomaly_map import gaussian_blur

torch.set_num_threads(1)
bundle, root, defect = sys.argv[1], sys.argv[2], sys.argv[3]
det = Detector.load(bundle, device="cpu")
model, cfg = det.model, det.bundle.config
(cat,) = discover(__import__("pathlib").Path(root))
samples = [s for s in cat.samples if s.defect in (defect, "good")]
D, M = [], []
with torch.inference_mode():
    for s in samples:
        img = load_image(s.image, cfg.preprocess).tensor[None]
        z0 = model.encode(img)
        D.append(model._novelty(z0, None)[0])
        M.append(mask_to_model_space(s.mask, cfg.preprocess) if s.mask else np.zeros(img.shape[-2:], bool))
size = M[0].shape
y = np.concatenate([m.ravel() for m in M])
def ap(fn):
    maps = [F.interpolate(fn(d[None]), size=size, mode="bilinear", align_corners=False)[0, 0].numpy() for d in D]
    return average_precision_score(y, np.concatenate([m.ravel() for m in maps]))
c = 2.0
variants = {
  "w3 clip2 blur1": lambda d: gaussian_blur(d[:, :1].clamp(0, c) / c, 1.0),
  "w1 clip2 blur1": lambda d: gaussian_blur(d[:, 1:2].clamp(0, c) / c, 1.0),
  "w3 noclip blur1": lambda d: gaussian_blur(d[:, :1], 1.0),
  "w1 noclip blur1": lambda d: gaussian_blur(d[:, 1:2], 1.0),
  "w1 noclip blur0": lambda d: d[:, 1:2],
  "w1 clip4 blur.5": lambda d: gaussian_blur(d[:, 1:2].clamp(0, 4) / 4, 0.5),
  "max(w3, beyond w1) blur1": lambda d: gaussian_blur(torch.maximum(d[:, :1].clamp(0, c) / c, ((d[:, 1:2] - 1) / (c - 1)).clamp(0, 1)), 1.0),
  "w3 + beyond w1 (sum, clip 1) blur1": lambda d: gaussian_blur((d[:, :1].clamp(0, c) / c + ((d[:, 1:2] - 1) / (c - 1)).clamp(0, 1)).clamp(0, 1), 1.0),
  "mean(w3, w1) clip2 blur1": lambda d: gaussian_blur((d[:, :1].clamp(0, c) + d[:, 1:2].clamp(0, c)) / (2 * c), 1.0),
  "max(w3, beyond w1) blur0": lambda d: torch.maximum(gaussian_blur(d[:, :1].clamp(0, c) / c, 1.0), ((d[:, 1:2] - 1) / (c - 1)).clamp(0, 1)),
}
for name, fn in variants.items():
    print(f"{defect:10s} {name:36s} P-AP {ap(fn):.3f}", flush=True)
q = np.concatenate([d[1].flatten().numpy() for d, m in zip(D, M)])
print("w1 distance quantiles (units):", np.quantile(q, [.5, .9, .99, .999]).round(2))
inside = []
for d, m in zip(D, M):
    if m.any():
        lat = F.adaptive_max_pool2d(torch.from_numpy(m)[None, None].float(), d.shape[-2:])[0, 0] > 0
        inside.append(d[:, lat])
if inside:
    ins = torch.cat(inside, dim=1)
    print("inside defects, w3 / w1 distance medians:", ins.median(dim=1).values.numpy().round(2), "max:", ins.max(dim=1).values.numpy().round(2))
