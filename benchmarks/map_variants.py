"""Experiment: post-processings of the correction that are not (yet) decodiff options.

Runs the bundle's correction once over the test images of one MVTec-layout category (and
over N normal training images, for statistics), caches the tensors in a .pt file, then
scores each variant with the same metric code as `decodiff benchmark`:

- base: the bundle's own map;
- minus_median: the map minus its per-image median (a global shift, such as a change of
  lighting, is not a local defect);
- channel_z: latent term as the mean over channels of |z0_hat - z0| / s_c, s_c the
  per-channel mean of that difference on normal images (channels that always change
  weigh less);
- position_z: the latent term as a z-score per position (the `--map-reference position` option);
- arithmetic_pixel_z: the pixel term as a z-score per position too.

    python benchmarks/map_variants.py BUNDLE CATEGORY_DIR PROTOCOL N_TRAIN CACHE.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from decodiff_cli.anomaly_map import gaussian_blur, latent_discrepancy, normal_reference, pixel_discrepancy
from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]


@torch.inference_mode()
def main() -> None:
    bundle, category_dir, protocol, n_train, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
    torch.set_num_threads(1)
    detector = Detector.load(bundle, device="cpu")
    model, cfg = detector.model, detector.bundle.config
    pre, mcfg = cfg.preprocess, cfg.anomaly_map
    category = discover(category_dir)[0]
    ids = detector._labels(detector.categories[0], 1)

    def run(tensors: torch.Tensor, decode: bool):
        z0 = torch.cat([model.encode(c) for c in tensors.split(8)])
        z0_hat = torch.cat([model._correct(c, ids.expand(len(c)), None) for c in z0.split(8)])
        if not decode:
            return z0, z0_hat, None, None
        return z0, z0_hat, torch.cat([model.decode(c) for c in z0.split(8)]), torch.cat([model.decode(c) for c in z0_hat.split(8)])

    if cache.is_file():
        saved = torch.load(cache)
    else:
        train = sorted((category_dir / "train" / "good").iterdir())
        train = train[:: max(1, len(train) // n_train)][:n_train]
        nz0, nz0_hat, nrec, ncor = run(torch.stack([load_image(p, pre).tensor for p in train]), decode=True)
        z0, z0_hat, rec, cor = run(torch.stack([load_image(s.image, pre).tensor for s in category.samples]), decode=True)
        saved = dict(nz0=nz0, nz0_hat=nz0_hat, z0=z0, z0_hat=z0_hat,
                     pixel=pixel_discrepancy(cor, rec, mcfg.pixel_clip, mcfg.pixel_sigma),
                     npixel=pixel_discrepancy(ncor, nrec, mcfg.pixel_clip, mcfg.pixel_sigma))
        torch.save(saved, cache)

    originals = [load_image(s.image, pre).original_size for s in category.samples]
    masks = np.stack([_protocol_mask(s, protocol) for s in category.samples])
    labels = np.array([s.label for s in category.samples])
    size = (pre.image_size, pre.image_size)
    pixel = saved["pixel"]
    normal_delta = (saved["nz0_hat"] - saved["nz0"]).abs()
    delta = (saved["z0_hat"] - saved["z0"]).abs()

    def up(latent_map: torch.Tensor, clip: float) -> torch.Tensor:
        m = gaussian_blur(latent_map.clamp(0, clip) / clip, mcfg.latent_sigma)
        return F.interpolate(m, size=size, mode="bilinear", align_corners=False)

    latent = {
        "raw": latent_discrepancy(saved["z0_hat"], saved["z0"], mcfg.latent_clip, mcfg.latent_sigma, size),
        "position_z": latent_discrepancy(saved["z0_hat"], saved["z0"], 6.0, mcfg.latent_sigma, size,
                                         normal_reference(normal_delta.mean(1, keepdim=True))[None].expand(len(delta), -1, -1, -1)),
    }
    scale = normal_delta.mean(dim=(0, 2, 3))[None, :, None, None]
    for clip in (2.0, 4.0):
        latent[f"channel_z{clip:g}"] = up((delta / scale).mean(1, keepdim=True), clip)

    def evaluate(name: str, maps: torch.Tensor) -> None:
        maps = np.stack([to_protocol(map_to_original(m.numpy(), o, pre), protocol) for m, o in zip(maps[:, 0], originals)])
        values = compute_metrics(maps.reshape(len(maps), -1).max(1), labels, maps, masks).values
        print(f"{name:32s}", " ".join(f"{values[k]:.3f}" for k in KEYS), flush=True)

    pixels = {"raw": pixel}
    if "npixel" in saved:  # the pixel term as a z-score per position too (blurred statistics)
        mean, spread = normal_reference(saved["npixel"])
        z = (pixel - mean) / (spread + spread.mean() + 1e-6)
        pixels["pixel_z"] = gaussian_blur(z.clamp(0, 6.0) / 6.0, 1.0)

    print(f"{'variant':32s}", " ".join(KEYS))
    for lname, lmap in latent.items():
        variants = [("latent", lmap)] + [(f"arithmetic_{pname}", (lmap + pmap) / 2) for pname, pmap in pixels.items()]
        for combine, maps in variants:
            evaluate(f"{lname}/{combine}", maps)
            median = maps.flatten(1).median(dim=1).values[:, None, None, None]
            evaluate(f"{lname}/{combine}/minus_median", (maps - median).clamp(min=0))


if __name__ == "__main__":
    main()
