"""Experiment (not an option): every map term in units of its normal 99th percentile, as the
feature term already is, instead of the fixed latent and pixel clips.

On magnetic tile the fixed clips leave the pixel term far below the others (its maxima
are ~0.05 of the clip); this measures whether self-calibrated units weigh the terms
better. Reads the tensors cached by map_variants.py; caches the decoder-feature
differences beside them (CACHE.feat.pt).

    python benchmarks/term_units.py BUNDLE CATEGORY_DIR PROTOCOL CACHE.pt
"""

from __future__ import annotations

import sys
from pathlib import Path
import numpy as np
import torch
from torch.nn import functional as F
from decodiff_cli.anomaly_map import feature_discrepancy, feature_scales, gaussian_blur, latent_difference, normal_reference
from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]
torch.set_num_threads(1)


@torch.inference_mode()
def main():
    bundle, category_dir, protocol, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    detector = Detector.load(bundle, device="cpu")
    model, cfg = detector.model, detector.bundle.config
    pre, m = cfg.preprocess, cfg.anomaly_map
    size = (pre.image_size, pre.image_size)
    s = torch.load(cache)
    feats_file = Path(cache).with_suffix(".feat.pt")
    if feats_file.is_file():
        feats = torch.load(feats_file)
    else:
        def levels(z0, z0_hat):
            parts = [model.decode_pairs(a, b, features=True)[2] for a, b in zip(z0.split(8), z0_hat.split(8))]
            return [torch.cat(p) for p in zip(*parts)]
        feats = dict(n=levels(s["nz0"], s["nz0_hat"]), t=levels(s["z0"], s["z0_hat"]))
        torch.save(feats, feats_file)
    nd, td = latent_difference(s["nz0_hat"], s["nz0"]), latent_difference(s["z0_hat"], s["z0"])
    lclip = m.latent_clip
    if m.reference != "none":  # the latent term as a z-score, as the bundle's map has it
        mean, spread = normal_reference(nd)[:, None]
        nd, td = [(d - mean) / (spread + spread.mean() + 1e-6) for d in (nd, td)]
        lclip = m.reference_clip

    def upsample(d):
        return F.interpolate(gaussian_blur(d.clamp(min=0), m.latent_sigma), size=size, mode="bilinear", align_corners=False)

    def unit(term, normal, clip=2.0):  # in units of the normal 99th percentile
        return (term / torch.quantile(normal.flatten()[::7][:2**24], 0.99)).clamp(0, clip) / clip

    nl, tl = upsample(nd), upsample(td)
    npix = s["npixel"] * m.pixel_clip  # undo the clip scaling (values never reach the clip here)
    tpix = s["pixel"] * m.pixel_clip
    scales = torch.tensor([feature_scales(feats["n"])]).expand(len(tl), -1)
    tf = feature_discrepancy(feats["t"], scales, 2.0, size)
    L, P = tl.clamp(0, lclip) / lclip, (tpix / m.pixel_clip).clamp(0, 1)
    print("median image maximum of each term with the fixed clips: latent %.3f pixel %.3f feature %.3f" % tuple(
        float(t.flatten(1).max(1).values.median()) for t in (L, P, tf)))
    samples = discover(category_dir)[0].samples
    originals = [load_image(x.image, pre).original_size for x in samples]
    masks = np.stack([_protocol_mask(x, protocol) for x in samples])
    labels = np.array([x.label for x in samples])

    def evaluate(name, maps):
        maps = np.stack([to_protocol(map_to_original(mm.numpy(), o, pre), protocol) for mm, o in zip(maps[:, 0], originals)])
        v = compute_metrics(maps.reshape(len(maps), -1).max(1), labels, maps, masks).values
        print(f"{name:34s}", " ".join(f"{v[k]:.3f}" for k in KEYS), flush=True)

    print(f"{'map':34s}", " ".join(KEYS))
    evaluate("clips: latent+pixel", (L + P) / 2)
    evaluate("clips: latent+pixel+feature", (L + P + tf) / 3)
    Lu, Pu = unit(tl, nl), unit(tpix, npix)
    evaluate("units: latent+pixel", (Lu + Pu) / 2)
    evaluate("units: latent+pixel+feature", (Lu + Pu + tf) / 3)
    evaluate("units clip4: latent+pixel+feature", (unit(tl, nl, 4.0) + unit(tpix, npix, 4.0) + feature_discrepancy(feats["t"], scales, 4.0, size)) / 3)


if __name__ == "__main__":
    main()
