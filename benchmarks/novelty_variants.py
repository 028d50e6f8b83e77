"""The novelty term on cached tensors: alone and averaged with the correction map, for
several bank sizes, with and without the 3x3 neighbourhood (novelty.neighbourhood).

Reads the tensors cached by map_variants.py (and the decoder-feature differences that
term_units.py caches beside them, CACHE.feat.pt); encodes every training image with the
bundle's autoencoder once (cached as CACHE.train_z0.pt). The correction map is the
bundle's arithmetic map of those tensors (latent term with the bundle's reference, pixel
term, feature term). The bank and the unit come from novelty.normal_bank and
novelty.novelty_scale, as at fit time, over all training images (the covering bank since
commit 5a731ea; RESULTS.md's table of this script was measured before it, with an equal
random share).

    python benchmarks/novelty_variants.py BUNDLE CATEGORY_DIR PROTOCOL CACHE.pt 16384,65536
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from decodiff_cli import novelty
from decodiff_cli.anomaly_map import (feature_discrepancy, feature_scales, latent_difference, latent_discrepancy,
                                      normal_reference, novelty_discrepancy)
from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.fitting import _spread_rows
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]


@torch.inference_mode()
def main() -> None:
    bundle, category_dir, protocol, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    sizes = [int(s) for s in sys.argv[5].split(",")]
    torch.set_num_threads(1)
    detector = Detector.load(bundle, device="cpu")
    cfg = detector.bundle.config
    pre, m = cfg.preprocess, cfg.anomaly_map
    size = (pre.image_size, pre.image_size)
    s, feats = torch.load(cache), torch.load(cache.with_suffix(".feat.pt"))
    train_file = cache.with_suffix(".train_z0.pt")
    if not train_file.is_file():
        paths = sorted((category_dir / "train" / "good").iterdir())
        torch.save(torch.cat([detector.model.encode(torch.stack([load_image(p, pre).tensor for p in paths[i:i + 16]]))
                              for i in range(0, len(paths), 16)]), train_file)
    train = torch.load(train_file)
    n = len(s["z0"])

    reference = None
    if m.reference != "none":
        reference = normal_reference(latent_difference(s["nz0_hat"], s["nz0"]))[None].expand(n, -1, -1, -1)
    latent = latent_discrepancy(s["z0_hat"], s["z0"], m.reference_clip if reference is not None else m.latent_clip,
                                m.latent_sigma, size, reference)
    features = feature_discrepancy(feats["t"], torch.tensor([feature_scales(feats["n"])]).expand(n, -1), m.feature_clip, size)
    correction_map = (latent + s["pixel"] + features) / 3

    samples = discover(category_dir)[0].samples
    originals = [load_image(x.image, pre).original_size for x in samples]
    masks = np.stack([_protocol_mask(x, protocol) for x in samples])
    labels = np.array([x.label for x in samples])

    def evaluate(name: str, maps: torch.Tensor) -> None:
        maps = np.stack([to_protocol(map_to_original(mm.numpy(), o, pre), protocol) for mm, o in zip(maps[:, 0], originals)])
        v = compute_metrics(maps.reshape(len(maps), -1).max(1), labels, maps, masks).values
        print(f"{name:40s}", " ".join(f"{v[k]:.3f}" for k in KEYS), flush=True)

    def novelty_map(bank_size: int) -> torch.Tensor:
        ids = torch.arange(len(train))
        bank, owner = novelty.normal_bank(lambda rows: train[rows], ids, bank_size)
        rows = _spread_rows([0] * len(train), 0)
        scale = novelty.novelty_scale(train[rows], rows, bank, owner)
        return novelty_discrepancy(novelty.nearest_distance(s["z0"], bank) / scale, m.novelty_clip, m.latent_sigma, size)

    print(f"{'map':40s}", " ".join(KEYS))
    evaluate("correction map (no novelty)", correction_map)
    own_neighbourhood = novelty.neighbourhood
    for bank_size in sizes:
        for with_neighbourhood in (False, True):
            novelty.neighbourhood = own_neighbourhood if with_neighbourhood else (lambda z: z.float())
            term = novelty_map(bank_size)
            name = f"bank {bank_size}{', 3x3' if with_neighbourhood else ', 1x1'}"
            evaluate(f"{name}: novelty alone", term)
            evaluate(f"{name}: mean with the correction map", (correction_map + term) / 2)
    novelty.neighbourhood = own_neighbourhood


if __name__ == "__main__":
    main()
