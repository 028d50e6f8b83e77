"""Issue 19 ablation (one-off): maps of several inference variants on the same weights.
compute: python variants.py compute BUNDLE DATASET SHARD NSHARDS OUT.pt
evaluate: python variants.py evaluate DATASET OUT*.pt"""
import sys, time
from dataclasses import replace
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from decodiff_cli.detector import Detector
from decodiff_cli.datasets import discover
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.benchmark import to_protocol, evaluate
from decodiff_cli.anomaly_map import MapInputs, TERMS, combine, _novelty_term, image_scores

def anomaly_maps(inp, cfg, terms):
    m = combine([TERMS[t](inp, cfg) for t in terms], cfg.combine)
    m = (1 - cfg.novelty_weight) * m + cfg.novelty_weight * _novelty_term(inp, cfg)
    return m[:, 0].clamp(0, 1)

KS = [5, 2]

def variants(cfg):
    return {"full": (["pixel", "latent", "features"], None), "nopix": (["latent", "features"], None),
            "nopix_f2": (["latent", "features"], 2), "latent_only": (["latent"], None)}

def compute(bundle, dataset, shard, nshards, out):
    det = Detector.load(bundle, device="cpu", batch_size=1)
    model = det.model; pre = det.bundle.config.preprocess
    (cat,) = discover(Path(dataset))
    samples = cat.samples[shard::nshards]
    name = det.categories[0]
    class_ids = None
    result = {}
    t0 = time.time()
    with torch.inference_mode():
        for i, s in enumerate(samples):
            im = load_image(s.image, pre)
            x = im.tensor[None]
            z0 = model.encode(x)
            novelty = model._novelty(z0, class_ids)
            ref = model._reference_rows(class_ids, 1)
            fs = model._feature_scales(class_ids, 1)
            for k in KS:
                z0_hat = model._correct(z0, class_ids, k)
                rec, cor, feats = model.decode_pairs(z0, z0_hat, True)
                mcfg = model.cfg.anomaly_map
                for vname, (terms, nlev) in variants(mcfg).items():
                    f = feats if nlev is None else feats[:nlev]
                    scales = fs if nlev is None else fs[:, :nlev]
                    inp = MapInputs(z0, z0_hat, tuple(x.shape[-2:]), rec, cor, reference=ref, features=f,
                                    feature_scales=scales, novelty=novelty)
                    m = anomaly_maps(inp, mcfg, terms)
                    score = image_scores(m, mcfg.score_top_fraction)[0].item()
                    a = to_protocol(map_to_original(m[0].numpy(), im.original_size, pre), "paper")
                    result.setdefault(f"{vname}_k{k}", {})[str(s.image)] = (a.astype(np.float16), score)
            print(f"{i+1}/{len(samples)} {time.time()-t0:.0f}s", file=sys.stderr, flush=True)
    torch.save(result, out)

def run_eval(dataset, files):
    merged = {}
    for f in files:
        for v, d in torch.load(f, weights_only=False).items():
            merged.setdefault(v, {}).update(d)
    for v, d in merged.items():
        def predict(paths, category):
            for p in paths:
                a, s = d[str(p)]
                yield a.astype(np.float32), s
        r = evaluate(Path(dataset), predict=predict, protocol="paper", per_defect=True)
        mean = r.mean
        print(v, " ".join(f"{k}={mean[k]:.4f}" for k in mean))
        for cat, defects in r.defects.items():
            for kind, vals in defects.items():
                print("   ", kind, " ".join(f"{k}={vals[k]:.4f}" for k in vals))

if __name__ == "__main__":
    if sys.argv[1] == "compute":
        compute(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        run_eval(sys.argv[2], sys.argv[3:])
