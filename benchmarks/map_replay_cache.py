"""One-off: score a bundle once, keep every MapInputs, then re-evaluate map-config variants on the same inputs."""
import dataclasses, json, sys, time
import torch
import decodiff_cli.model as M
from decodiff_cli.anomaly_map import anomaly_maps
from decodiff_cli.benchmark import evaluate
from decodiff_cli.evaluation import BundlePredictor
from decodiff_cli.detector import Detector

data, bundle, variants = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(1)
import os; PROTO = os.environ.get("PROTO", "paper")
cache, mode, pos = [], "record", [0]

def cpu(x):
    if x is None: return None
    if isinstance(x, list): return [cpu(v) for v in x]
    return x.detach().cpu().clone()

real = M.anomaly_maps
def recording(inputs, cfg):
    cache.append(M.MapInputs(**{f.name: cpu(getattr(inputs, f.name)) if f.name != "size" else inputs.size
                                for f in dataclasses.fields(inputs)}))
    return real(inputs, cfg)
M.anomaly_maps = recording
orig_maps = M.DecoDiffModel._maps
def replay(self, images, class_ids, steps, keep, z0):
    inputs = cache[pos[0]]; pos[0] += 1
    return anomaly_maps(inputs, self.cfg.anomaly_map), None, {"encode": 0.0, "denoiser": 0.0, "decode": 0.0, "map": 0.0}

det = Detector.load(bundle, device="cpu")
base = dataclasses.replace(det.bundle.config.anomaly_map)
KEYS = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]
import decodiff_cli.anomaly_map as A
saved = dict(vars(A))
def run(name, edits, hook=""):
    vars(A).update(saved)
    exec(hook, {"A": A, "torch": torch, "F": torch.nn.functional, "saved": saved})
    det.model.cfg.anomaly_map = dataclasses.replace(base, **edits)
    pos[0] = 0
    t = time.time()
    r = evaluate(data, protocol=PROTO, predict=BundlePredictor(det, PROTO), per_defect=True)
    d = r.to_dict()
    cat = next(iter(d["categories"]))
    rows = {"ALL": d["categories"][cat]} | d["defects"][cat]
    print(f"== {name} {edits} {hook!r} ({time.time()-t:.0f}s)")
    for k, v in rows.items():
        print(f"  {k:16s} " + " ".join(f"{key} {v[key]:.4f}" for key in KEYS) + f"  iap {v['image_ap']*100:5.1f}")
    sys.stdout.flush()

import os
store = sys.argv[4] if len(sys.argv) > 4 else None
if store and os.path.exists(store):
    cache[:] = torch.load(store, weights_only=False)
    M.DecoDiffModel._maps = replay
    run("default (replayed)", {})
else:
    run("record", {})
    if store:
        torch.save(cache, store)
    M.DecoDiffModel._maps = replay
for v in variants:
    run(*v)
