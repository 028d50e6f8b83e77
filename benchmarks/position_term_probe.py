"""One-off (issue 20): candidate per-position novelty terms replayed on stored MapInputs (recorded by map_replay_cache.py of commit 1b054f1).
args: DATA BUNDLE CACHE.pt ZTRAIN.pt VARIANTS_JSON ; PROTO env."""
import dataclasses, json, os, sys, time
import torch
from torch.nn import functional as F
import decodiff_cli.model as M
import decodiff_cli.anomaly_map as A
from decodiff_cli.benchmark import evaluate
from decodiff_cli.evaluation import BundlePredictor
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image
from decodiff_cli.novelty import covering, _nearest, _vectors, neighbourhood

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
data, bundle, store, ztr_path, variants = sys.argv[1:6]
variants = json.loads(variants)
PROTO = os.environ.get("PROTO", "paper")
det = Detector.load(bundle, device="cpu")
cat = det.categories[0]
pre = det.bundle.config.preprocess

# training latents, as the model encodes them
if os.path.exists(ztr_path):
    ztr = torch.load(ztr_path)
else:
    from pathlib import Path
    folder = Path(data) / "train" / "good"
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp", ".jpeg", ".tif", ".tiff"))
    zs = []
    with torch.inference_mode():
        for i in range(0, len(paths), 8):
            zs.append(det.model.encode(torch.stack([load_image(p, pre).tensor for p in paths[i:i + 8]])).float())
    ztr = torch.cat(zs)
    torch.save(ztr, ztr_path)
print("train latents", tuple(ztr.shape), flush=True)

g = torch.Generator().manual_seed(0)
perm = torch.randperm(len(ztr), generator=g)
nh = min(40, len(ztr) // 5); held, fit = ztr[perm[:nh]], ztr[perm[nh:]]


def surround(z):  # z minus the mean of its 8 neighbours
    ring = (F.avg_pool2d(F.pad(z, (1,) * 4, mode="replicate"), 3, stride=1) * 9 - z) / 8
    return z - ring


FEATS = {}
BANK = 65536
banks, units = {}, {}
for name, f in FEATS.items():
    pool = _vectors(f(fit))
    pick = torch.randperm(len(pool), generator=g)[: 8 * BANK]
    pool = pool[pick].contiguous()
    banks[name] = pool[covering(pool, BANK, g)].contiguous()
    units[name] = float(torch.quantile(_nearest(_vectors(f(held)).contiguous(), banks[name]), 0.99))
# global Gaussian of single vectors (class-wide mean and covariance)
v = _vectors(fit)
mu = v.mean(0)
cov = torch.cov((v - mu).T) + 1e-3 * torch.eye(v.shape[1])
prec = torch.linalg.inv(cov)
def maha(z):
    d = _vectors(z) - mu
    return ((d @ prec) * d).sum(1).clamp_min(0).sqrt().view(len(z), *z.shape[-2:])
units["gm"] = float(torch.quantile(maha(held).flatten(), 0.99))
sd = v.std(0)
def gdiag(z):
    return (((z - mu.view(1, -1, 1, 1)) / sd.view(1, -1, 1, 1)) ** 2).mean(1).sqrt()
units["gd"] = float(torch.quantile(gdiag(held).flatten(), 0.99))
pmean = fit.mean(0, keepdim=True)
def pm(z):
    return ((z - pmean) / sd.view(1, -1, 1, 1)).abs().mean(1)
units["pm"] = float(torch.quantile(pm(held).flatten(), 0.99))
psd = A.gaussian_blur(fit.std(0)[:, None], 1.0)[:, 0][None]
def pp(z):
    return (((z - pmean) / (psd + psd.mean())) ** 2).mean(1).sqrt()
units["pp"] = float(torch.quantile(pp(held).flatten(), 0.99))
def pk(z):
    m = pp(z)[:, None] / units["pp"]
    return (m - F.avg_pool2d(F.pad(m, (1,) * 4, mode="replicate"), 3, stride=1))[:, 0]
units["pk"] = float(torch.quantile(pk(held).flatten(), 0.99))
pscale = psd + psd.mean()
def pshift(z, r):
    h, w = z.shape[-2:]
    mp = F.pad(pmean, (r,) * 4, mode="replicate"); sp = F.pad(pscale, (r,) * 4, mode="replicate")
    best = None
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            d = (((z - mp[..., dy:dy + h, dx:dx + w]) / sp[..., dy:dy + h, dx:dx + w]) ** 2).mean(1).sqrt()
            best = d if best is None else torch.minimum(best, d)
    return best
# per-position mean, covariance of the residuals: pooled over positions, or each position's shrunk to it
res = (fit - pmean)  # (n, C, h, w)
C = res.shape[1]
rv = res.permute(2, 3, 0, 1).reshape(-1, res.shape[0], C)  # (P, n, C)
pooled = torch.einsum("pnc,pnd->cd", rv, rv) / (rv.shape[0] * rv.shape[1])
prec_pool = torch.linalg.inv(pooled + 1e-4 * torch.eye(C))
loc = torch.einsum("pnc,pnd->pcd", rv, rv) / rv.shape[1]
LAM = float(os.environ.get("LAM", "0.5"))
prec_loc = torch.linalg.inv((1 - LAM) * loc + LAM * pooled + 1e-4 * torch.eye(C))
def pmaha(z, P):
    d = (z - pmean).permute(0, 2, 3, 1).reshape(len(z), -1, C)  # (N, P, C)
    if P.dim() == 2:
        q = ((d @ P) * d).sum(-1)
    else:
        q = torch.einsum("npc,pcd,npd->np", d, P, d)
    return (q.clamp_min(0) / C).sqrt().view(len(z), *z.shape[-2:])
units["pa"] = float(torch.quantile(pmaha(held, prec_pool).flatten(), 0.99))
units["pl"] = float(torch.quantile(pmaha(held, prec_loc).flatten(), 0.99))
vbar = torch.diagonal(pooled).mean()
def prec_blend(mu):
    return torch.linalg.inv((1 - mu) * ((1 - LAM) * loc + LAM * pooled) + mu * vbar * torch.eye(C) + 1e-4 * torch.eye(C))
prec_b5, prec_b8 = prec_blend(0.5), prec_blend(0.8)
units["b5"] = float(torch.quantile(pmaha(held, prec_b5).flatten(), 0.99))
units["b8"] = float(torch.quantile(pmaha(held, prec_b8).flatten(), 0.99))
def pmx(z):
    return torch.maximum(pp(z) / units["pp"], pmaha(z, prec_loc) / units["pl"])
def pav(z):
    return (pp(z) / units["pp"] + pmaha(z, prec_loc) / units["pl"]) / 2
units["mx"] = float(torch.quantile(pmx(held).flatten(), 0.99))
units["av"] = float(torch.quantile(pav(held).flatten(), 0.99))
units["ps"] = float(torch.quantile(pshift(held, 1).flatten(), 0.99))
units["ps2"] = float(torch.quantile(pshift(held, 2).flatten(), 0.99))
print("units", units, flush=True)

cache = torch.load(store, weights_only=False)
t = time.time()
extra = []
for x in cache:
    z = x.z0.float()
    h, w = z.shape[-2:]
    cols = []
    for name, f in FEATS.items():
        q = _vectors(f(z)).contiguous()
        cols.append((_nearest(q, banks[name]) / units[name]).view(len(z), h, w))
    cols += [maha(z) / units["gm"], gdiag(z) / units["gd"], pm(z) / units["pm"], pp(z) / units["pp"], pk(z) / units["pk"], pshift(z, 1) / units["ps"], pshift(z, 2) / units["ps2"], pmaha(z, prec_pool) / units["pa"], pmaha(z, prec_loc) / units["pl"], pmx(z) / units["mx"], pav(z) / units["av"], pmaha(z, prec_b5) / units["b5"], pmaha(z, prec_b8) / units["b8"]]
    extra.append(torch.stack(cols, 1))
print(f"candidates computed ({time.time() - t:.0f}s)", flush=True)
from decodiff_cli.datasets import discover
labels = [smp.defect for smp in discover(data)[0].samples]
offsets, o = [], 0
for x in cache:
    offsets.append(o); o += len(x.z0)
assert o == len(labels), (o, len(labels))
IDX = {"gm": 0, "gd": 1, "pm": 2, "pp": 3, "pk": 4, "ps": 5, "ps2": 6, "pa": 7, "pl": 8, "mx": 9, "av": 10, "b5": 11, "b8": 12}

pos = [0]
cur = {}
real_nd = A.novelty_discrepancy


def nd(distances, clip, sigma, size, positions=False):
    i = pos[0] - 1
    spec = cur.get("extra")
    term = distances[:, :1].clamp(0, clip) / clip
    if spec:
        e = extra[i][:, IDX[spec]: IDX[spec] + 1]
        if cur.get("nms"):
            e = e * (e >= F.max_pool2d(F.pad(e, (1,) * 4, mode="replicate"), 3, stride=1))
        if "only" in cur:
            keep = torch.tensor([(labels[offsets[i] + j] == "good") == (cur["only"] == "good") for j in range(len(e))])
            e = torch.where(keep.view(-1, 1, 1, 1), e, torch.zeros_like(e))
        thr, how = cur.get("thr", 1.0), cur.get("how", "beyond")
        if "rel" in cur:  # each image's own level of the term raises the threshold
            lvl = torch.quantile(e.flatten(1), cur["rel"], dim=1).view(-1, 1, 1, 1)
            e = e - (lvl - thr).clamp(min=0)
        if how == "noisyor":
            beyond = cur.get("gain", 1.0) * A.gaussian_blur(((e - thr) / (clip - thr)).clamp(0, 1), cur["esig"])
            term = A.gaussian_blur(term, cur.get("sigma", sigma))
            term = 1 - (1 - term) * (1 - beyond.clamp(0, 1))
            return F.interpolate(term, size=size, mode="bilinear", align_corners=False)
        if how == "beyond" and "esig" in cur:
            beyond = cur.get("gain", 1.0) * ((e - thr) / (clip - thr)).clamp(0, 1)
            if "gate" in cur:  # only where the correction moved the latent too
                x = cache[i]
                d = A.latent_difference(x.z0_hat.float(), x.z0.float())
                if x.reference is not None:
                    mean, spread = x.reference[:, :1], x.reference[:, 1:]
                    d = (d - mean) / (spread + spread.mean(dim=(2, 3), keepdim=True) + 1e-6)
                lc = det.model.cfg.anomaly_map.latent_clip if x.reference is None else det.model.cfg.anomaly_map.reference_clip
                g = (d.clamp(0, lc) / lc / cur["gate"]).clamp(0, 1)
                if cur.get("gby"):  # gate by the pixel term or the whole correction map instead
                    cfg = det.model.cfg.anomaly_map
                    names = ["pixel"] if cur["gby"] == "pixel" else cfg.correction_terms()
                    cm = A.combine([A.TERMS[n](x, cfg) for n in names], cfg.combine)
                    g = (F.adaptive_max_pool2d(cm, e.shape[-2:]) / cur["gate"]).clamp(0, 1)
                if cur.get("gpool"):
                    g = F.max_pool2d(g, 2 * cur["gpool"] + 1, stride=1, padding=cur["gpool"])
                beyond = beyond * g
            term = (A.gaussian_blur(term, cur.get("sigma", sigma)) + A.gaussian_blur(beyond, cur["esig"])).clamp(max=1)
            return F.interpolate(term, size=size, mode="bilinear", align_corners=False)
        if how == "beyond":
            term = (term + cur.get("gain", 1.0) * ((e - thr) / (clip - thr)).clamp(0, 1)).clamp(max=1)
        elif how == "max":
            term = torch.maximum(term, (e.clamp(0, clip) / clip))
        elif how == "mixin":
            term = (1 - cur["a"]) * term + cur["a"] * e.clamp(0, clip) / clip
        elif how == "alone":
            term = e.clamp(0, clip) / clip
    term = A.gaussian_blur(term, cur.get("sigma", sigma))
    return F.interpolate(term, size=size, mode="bilinear", align_corners=False)


A.novelty_discrepancy = nd


def replay(self, images, class_ids, steps, keep, z0):
    inputs = cache[pos[0]]; pos[0] += 1
    return A.anomaly_maps(inputs, self.cfg.anomaly_map), None, {"encode": 0.0, "denoiser": 0.0, "decode": 0.0, "map": 0.0}


M.DecoDiffModel._maps = replay
base = dataclasses.replace(det.bundle.config.anomaly_map)
KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]
for name, edits, spec in [["default", {}, {}]] + variants:
    cur.clear(); cur.update(spec)
    det.model.cfg.anomaly_map = dataclasses.replace(base, **edits)
    pos[0] = 0
    t = time.time()
    d = evaluate(data, protocol=PROTO, predict=BundlePredictor(det, PROTO), per_defect=True).to_dict()
    rows = {"ALL": d["categories"][cat]} | d["defects"][cat]
    print(f"== {name} {edits} {spec} ({time.time() - t:.0f}s)")
    for k, r in rows.items():
        print(f"  {k:14s} " + " ".join(f"{key[:9]} {r[key]:.3f}" for key in KEYS))
    sys.stdout.flush()
