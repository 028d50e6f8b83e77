"""One-off (issue 20): where the per-channel per-position excess falls on the tiles: its mass inside and outside the
labelled regions per image, and a picture of eight broken tiles. args: DATA BUNDLE CACHE.pt ZTRAIN.pt"""
import sys, torch, numpy as np
from PIL import Image
from torch.nn import functional as F
import decodiff_cli.anomaly_map as A
from decodiff_cli.detector import Detector
from decodiff_cli.datasets import discover
from decodiff_cli.images import mask_to_model_space, load_image
torch.set_num_threads(1)
data, bundle, store, ztr = sys.argv[1:5]
det = Detector.load(bundle, device="cpu"); pre = det.bundle.config.preprocess
fit = torch.load(ztr)
pmean = fit.mean(0, keepdim=True)
psd = A.gaussian_blur(fit.std(0)[:, None], 1.0)[:, 0][None]
unit = None
def pp(z): return (((z - pmean) / (psd + psd.mean())) ** 2).mean(1).sqrt()
unit = float(torch.quantile(pp(fit[:40]).flatten(), .99))
cache = torch.load(store, weights_only=False)
z = torch.cat([x.z0.float() for x in cache]); nov = torch.cat([x.novelty.float() for x in cache])
samples = discover(data)[0].samples
e = ((pp(z) / unit - 1) / 1).clamp(0, 1)  # beyond 1, clip 2
stats = {}
out = []
for i, s in enumerate(samples):
    if s.defect not in ("break", "blowhole", "good"): continue
    if s.mask is not None:
        m = torch.from_numpy(mask_to_model_space(str(s.mask), pre)).float()[None, None]
        g = F.max_pool2d(F.adaptive_avg_pool2d(m, z.shape[-2:]).gt(0).float(), 3, 1, 1)[0, 0]
    else:
        g = torch.zeros(z.shape[-2:])
    inside = float((e[i] * g).sum()); outside = float((e[i] * (1 - g)).sum())
    stats.setdefault(s.defect, []).append((inside, outside, float(nov[i, 0].clamp(0, 2).mean())))
    if s.defect == "break" and len(out) < 8:
        img = load_image(s.image, pre).tensor
        im = ((img.mean(0) + 1) / 2 if img.min() < 0 else img.mean(0)).clamp(0, 1).numpy()
        big = lambda t: np.kron(t.numpy(), np.ones((8, 8)))
        row = np.concatenate([im, big(g) * .5 + im * .5, big(e[i]), big((nov[i, 0].clamp(0, 2) / 2))], 1)
        out.append(row)
for k, v in stats.items():
    a = np.array(v); print(k, len(a), "excess inside %.2f outside %.2f (mean per image), novelty mean %.3f" % (a[:, 0].mean(), a[:, 1].mean(), a[:, 2].mean()))
Image.fromarray((np.concatenate(out, 0) * 255).astype(np.uint8)).save("look_break.png")
