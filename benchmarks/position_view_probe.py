"""One-off probe (issue 20): record a bundle's MapInputs once (CACHE), then replay variants of the
novelty term on them. args: DATA BUNDLE CACHE VARIANTS.py [names,...]; env PROTO, THREADS."""
import dataclasses, os, sys, time, runpy
import torch
from torch.nn import functional as F
import decodiff_cli.model as M
import decodiff_cli.anomaly_map as A
from decodiff_cli.benchmark import evaluate
from decodiff_cli.evaluation import BundlePredictor
from decodiff_cli.detector import Detector

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
data, bundle, store, vfile = sys.argv[1:5]
only = sys.argv[5].split(",") if len(sys.argv) > 5 else None
PROTO = os.environ.get("PROTO", "paper")
det = Detector.load(bundle, device="cpu")
cat = det.categories[0]
cache, pos = [], [0]
KEYS = ["image_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]

def cpu(v):
    if v is None: return None
    if isinstance(v, list): return [cpu(u) for u in v]
    return v.detach().cpu().clone()

def show(name, t):
    d = evaluate(data, protocol=PROTO, predict=BundlePredictor(det, PROTO), per_defect=True).to_dict()
    rows = {"ALL": d["categories"][cat]} | d["defects"][cat]
    print(f"== {name} ({time.time() - t:.0f}s)")
    for k, r in rows.items():
        print(f"  {k:14s} " + " / ".join(f"{r[key]:.3f}" for key in KEYS) + f"   iap {r['image_ap']:.3f}")
    sys.stdout.flush()
    return rows

if os.path.exists(store):
    cache[:] = torch.load(store, weights_only=False)
else:
    real = M.anomaly_maps
    def recording(inputs, cfg):
        cache.append(M.MapInputs(**{f.name: cpu(getattr(inputs, f.name)) if f.name != "size" else inputs.size
                                    for f in dataclasses.fields(inputs)}))
        return real(inputs, cfg)
    M.anomaly_maps = recording
    show("record", time.time())
    torch.save(cache, store)
    M.anomaly_maps = real

cur = [None]
real_nd = A.novelty_discrepancy
def nd(distances, clip, sigma, size, positions=False):
    if cur[0] is None:
        return real_nd(distances, clip, sigma, size, positions)
    return cur[0](cache[pos[0] - 1], distances, clip, sigma, size)
A.novelty_discrepancy = nd

def replay(self, images, class_ids, steps, keep, z0):
    inputs = cache[pos[0]]; pos[0] += 1
    return A.anomaly_maps(inputs, self.cfg.anomaly_map), None, {}
M.DecoDiffModel._maps = replay

env = {"A": A, "F": F, "torch": torch, "det": det, "cache": cache, "data": data}
variants = runpy.run_path(vfile, init_globals=env)["VARIANTS"]
for name, fn in [("default", None)] + list(variants):
    if only and name not in only and name != "default":
        continue
    cur[0] = fn; pos[0] = 0
    show(name, time.time())
