"""Issue 19/20 ablation (one-off): the fast correction map (2 calls, no pixel term, 2 feature
levels) with novelty variants (3x3 vs single positions vs both; blur), same weights.
compute: python novelty_variants.py compute BUNDLE DATASET SHARD NSHARDS OUT.pt"""
import sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from decodiff_cli import novelty
from decodiff_cli.detector import Detector
from decodiff_cli.datasets import discover
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.benchmark import to_protocol
from decodiff_cli.anomaly_map import MapInputs, TERMS, combine, novelty_discrepancy, image_scores
from decodiff_cli.fitting import split_holdout
from decodiff_cli.inputs import is_image_name

ORIGINAL = novelty.neighbourhood
def single(z):
    return z.float()

def banks(model, cfg, dataset):
    train = sorted(p for p in (Path(dataset) / "train" / "good").iterdir() if is_image_name(p))
    train, _ = split_holdout(train, cfg.train.holdout_fraction, cfg.train.min_holdout, cfg.train.seed)
    z = torch.cat([model.encode(load_image(p, cfg.preprocess).tensor[None]) for p in train])
    out = {}
    for name, hood in (("n3", ORIGINAL), ("n1", single)):
        novelty.neighbourhood = hood
        ids = torch.arange(len(z))
        bank, owner = novelty.normal_bank(lambda rows: z[rows], ids, cfg.anomaly_map.novelty_bank)
        spread = torch.linspace(0, len(z) - 1, min(len(z), 64)).round().long().unique()
        scale = novelty.novelty_scale(z[spread], spread, bank, owner)
        out[name] = (bank, scale, hood)
        print(name, len(bank), scale, file=sys.stderr, flush=True)
    novelty.neighbourhood = ORIGINAL
    return out

def nov(z0, bank, scale, hood):
    novelty.neighbourhood = hood
    try:
        return novelty.nearest_distance(z0, bank) / scale
    finally:
        novelty.neighbourhood = ORIGINAL

def compute(bundle, dataset, shard, nshards, out):
    det = Detector.load(bundle, device="cpu", batch_size=1)
    model = det.model; cfg = det.bundle.config; pre = cfg.preprocess; mcfg = cfg.anomaly_map
    mcfg.feature_levels = 2
    (cat,) = discover(Path(dataset))
    samples = cat.samples[shard::nshards]
    t0 = time.time()
    with torch.inference_mode():
        cache = Path(out).with_name(Path(dataset).name + "_banks.pt")
        if cache.exists():
            saved = torch.load(cache)
            bk = {k: (b, sc, ORIGINAL if k == "n3" else single) for k, (b, sc) in saved.items()}
        else:
            bk = banks(model, cfg, dataset)
            torch.save({k: (b, sc) for k, (b, sc, _) in bk.items()}, cache)
        print(f"banks {time.time()-t0:.0f}s", file=sys.stderr, flush=True)
        result = {}
        for i, s in enumerate(samples):
            im = load_image(s.image, pre); x = im.tensor[None]
            z0 = model.encode(x)
            ref = model._reference_rows(None, 1)
            fs = model._feature_scales(None, 1)[:, :2]
            z0_hat = model._correct(z0, None, 2)
            _, _, feats = model.decode_pairs(z0, z0_hat, True, images=False)
            inp = MapInputs(z0, z0_hat, tuple(x.shape[-2:]), reference=ref, features=feats, feature_scales=fs)
            corr = combine([TERMS[t](inp, mcfg) for t in ("latent", "features")], mcfg.combine)
            d = {"bundle3": model._novelty(z0, None)}
            for name, (bank, scale, hood) in bk.items():
                d[name] = nov(z0, bank, scale, hood)
            size = tuple(x.shape[-2:])
            terms = {
                "fast_bundle": novelty_discrepancy(d["bundle3"], mcfg.novelty_clip, 1.0, size),
                "fast_n3": novelty_discrepancy(d["n3"], mcfg.novelty_clip, 1.0, size),
                "fast_n1": novelty_discrepancy(d["n1"], mcfg.novelty_clip, 1.0, size),
                "fast_n1_s05": novelty_discrepancy(d["n1"], mcfg.novelty_clip, 0.5, size),
                "fast_n3_s05": novelty_discrepancy(d["n3"], mcfg.novelty_clip, 0.5, size),
                "fast_n13": (novelty_discrepancy(d["n1"], mcfg.novelty_clip, 1.0, size)
                             + novelty_discrepancy(d["n3"], mcfg.novelty_clip, 1.0, size)) / 2,
                "fast_n13_s05": (novelty_discrepancy(d["n1"], mcfg.novelty_clip, 0.5, size)
                                 + novelty_discrepancy(d["n3"], mcfg.novelty_clip, 0.5, size)) / 2,
            }
            w = mcfg.novelty_weight
            for vname, term in terms.items():
                m = ((1 - w) * corr + w * term)[:, 0].clamp(0, 1)
                score = image_scores(m, mcfg.score_top_fraction)[0].item()
                a = to_protocol(map_to_original(m[0].numpy(), im.original_size, pre), "paper")
                result.setdefault(vname, {})[str(s.image)] = (a.astype(np.float16), score)
            # novelty alone (n3 rebuilt, n1) for reference
            for vname, term in (("novelty_only_n3", terms["fast_n3"]), ("novelty_only_n1", terms["fast_n1"])):
                m = term[:, 0].clamp(0, 1)
                score = image_scores(m, mcfg.score_top_fraction)[0].item()
                a = to_protocol(map_to_original(m[0].numpy(), im.original_size, pre), "paper")
                result.setdefault(vname, {})[str(s.image)] = (a.astype(np.float16), score)
            print(f"{i+1}/{len(samples)} {time.time()-t0:.0f}s", file=sys.stderr, flush=True)
    torch.save(result, out)

if __name__ == "__main__":
    compute(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
