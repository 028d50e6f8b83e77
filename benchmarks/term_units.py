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
from decodiff_cli.anomaly_map import feature_discrepancy, gaussian_blur, latent_difference, normal_reference, pixel_discrepancy
from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]
torch.set_num_threads(1)


@torch.inference_mode()
def main():
    bundle, category_dir, protocol, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    det = Detector.load(bundle, device="cpu")
    model, cfg = det.model, det.bundle.config
    pre, m = cfg.preprocess, cfg.anomaly_map
    size = (pre.image_size, pre.image_size)
    s = torch.load(cache)
    feats_file = Path(cache).with_suffix(".feat.pt")
    if feats_file.is_file():
        feats = torch.load(feats_file)
    else:
        def levels(z0, z0_hat):
            parts = [model.decode_pairs(a, b)[2] for a, b in zip(z0.split(8), z0_hat.split(8))]
            return [torch.cat(p) for p in zip(*parts)]
        feats = dict(n=levels(s["nz0"], s["nz0_hat"]), t=levels(s["z0"], s["z0_hat"]))
        torch.save(feats, feats_file)
    aligned = m.reference != "none"
    nd, td = latent_difference(s["nz0_hat"], s["nz0"]), latent_difference(s["z0_hat"], s["z0"])
    if aligned:
        ref = normal_reference(nd)
        mean, spread = ref[None, :1], ref[None, 1:]
        z = lambda d: (d - mean) / (spread + spread.mean() + 1e-6)
        nd, td = z(nd), z(td)
        lclip = m.reference_clip
    else:
        lclip = m.latent_clip
    up = lambda d: F.interpolate(gaussian_blur(d.clamp(min=0), m.latent_sigma), size=size, mode="bilinear", align_corners=False)
    nl, tl = up(nd), up(td)
    npix = s["npixel"] * m.pixel_clip  # undo the clip scaling (values never reach the clip here)
    tpix = s["pixel"] * m.pixel_clip
    scales = torch.tensor([[torch.quantile(l.flatten()[:2**24], 0.99).item() for l in feats["n"]]])
    tf = feature_discrepancy(feats["t"], scales.expand(len(tl), -1), 2.0, size)
    q = lambda x: torch.quantile(x.flatten()[::7][:2**24], 0.99).item()
    unit = lambda t, n, c=2.0: (t / q(n)).clamp(0, c) / c
    print("normal p99: latent %.4f pixel %.4f; clipped terms max medians: latent %.3f pixel %.3f feature %.3f" % (
        q(nl), q(npix), (tl.clamp(0, lclip) / lclip).flatten(1).max(1).values.median(), (tpix / m.pixel_clip).flatten(1).max(1).values.median(), tf.flatten(1).max(1).values.median()))
    samples = discover(category_dir)[0].samples
    originals = [load_image(x.image, pre).original_size for x in samples]
    masks = np.stack([_protocol_mask(x, protocol) for x in samples])
    labels = np.array([x.label for x in samples])

    def evaluate(name, maps):
        maps = np.stack([to_protocol(map_to_original(mm.numpy(), o, pre), protocol) for mm, o in zip(maps[:, 0], originals)])
        v = compute_metrics(maps.reshape(len(maps), -1).max(1), labels, maps, masks).values
        print(f"{name:34s}", " ".join(f"{v[k]:.3f}" for k in KEYS), flush=True)

    L, P = tl.clamp(0, lclip) / lclip, (tpix / m.pixel_clip).clamp(0, 1)
    print(f"{'map':34s}", " ".join(KEYS))
    evaluate("clips: latent+pixel", (L + P) / 2)
    evaluate("clips: latent+pixel+feature", (L + P + tf) / 3)
    Lu, Pu = unit(tl, nl), unit(tpix, npix)
    evaluate("units: latent+pixel", (Lu + Pu) / 2)
    evaluate("units: latent+pixel+feature", (Lu + Pu + tf) / 3)
    for c in (4.0,):
        evaluate(f"units clip{c:g}: latent+pixel+feature", (unit(tl, nl, c) + unit(tpix, npix, c) + feature_discrepancy(feats["t"], scales.expand(len(tl), -1), c, size)) / 3)


if __name__ == "__main__":
    main()
