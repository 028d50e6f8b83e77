"""Where the novelty term looks, on one bundle's weights, with AUPRO per defect type: the
neighbourhood each latent vector is averaged over (1x1, 3x3 as fit does, 5x5), the
term's clip and blur, a coarser grid (latents average-pooled 2x2 first, alone or the
maximum with the usual grid), and a finer one (the images encoded at twice the bundle's
resolution, alone or averaged with the usual grid). Each map is weighed 2:1 against the
bundle's correction map, as the cpu preset does; the image score is the mean of the top
1%, as `decodiff score` gives it. AUPRO per defect type is measured on that type's images
beside the normal ones, as `decodiff benchmark --per-defect` does.

CACHE.pt is novelty_mix.py's (it is written on the first run of either script); the
latents at twice the resolution are cached beside it, in CACHE.pt.fine.pt.

    python benchmarks/novelty_grids.py BUNDLE CATEGORY_DIR PROTOCOL CACHE.pt
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from decodiff_cli import novelty
from decodiff_cli.anomaly_map import image_scores, novelty_discrepancy
from decodiff_cli.benchmark import _protocol_mask, to_protocol
from decodiff_cli.fitting import _spread_rows
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics, pixel_metrics

sys.path.insert(0, str(Path(__file__).parent))
from novelty_mix import cached_run, encode_all, train_images  # noqa: E402

KEYS = ["image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]


@contextlib.contextmanager
def neighbourhood(k: int):
    """novelty.py with each vector averaged over k x k neighbours instead of 3 x 3."""
    usual = novelty.neighbourhood
    novelty.neighbourhood = lambda z: F.avg_pool2d(F.pad(z.float(), (k // 2,) * 4, mode="replicate"), k, stride=1)
    try:
        yield
    finally:
        novelty.neighbourhood = usual


def distances(test: torch.Tensor, train: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-normal distances of the test latents in units of their normal scale, with a
    bank and unit chosen from the training latents as fit does."""
    bank, owner = novelty.normal_bank(lambda rows: train[rows], torch.arange(len(train)), size)
    rows = _spread_rows([0] * len(train), 0)
    return novelty.nearest_distance(test, bank) / novelty.novelty_scale(train[rows], rows, bank, owner)


@torch.inference_mode()
def main() -> None:
    bundle, category_dir, protocol, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    detector, samples, correction_map, z0, train = cached_run(bundle, category_dir, cache)
    pre, m = detector.bundle.config.preprocess, detector.bundle.config.anomaly_map
    size, model_size = m.novelty_bank, correction_map.shape[-2:]

    fine_cache = Path(f"{cache}.fine.pt")
    if not fine_cache.is_file():
        fine = dataclasses.replace(pre, image_size=2 * pre.image_size, resize=2 * pre.resize)
        torch.save({"z0": encode_all(detector, [s.image for s in samples], fine),
                    "train_z0": encode_all(detector, train_images(category_dir), fine)}, fine_cache)
    fine_z0, fine_train = (torch.load(fine_cache)[k].float() for k in ("z0", "train_z0"))

    originals = [load_image(x.image, pre).original_size for x in samples]
    masks = np.stack([_protocol_mask(x, protocol) for x in samples])
    labels = np.array([x.label for x in samples])
    kinds = np.array([x.defect for x in samples])

    def term(d: torch.Tensor, clip: float = m.novelty_clip, sigma: float = m.latent_sigma) -> torch.Tensor:
        return novelty_discrepancy(d, clip, sigma, model_size)[:, 0]

    def report(name: str, novelty_map: torch.Tensor) -> None:
        maps = (correction_map / 3 + 2 * novelty_map / 3).clamp(0, 1)
        protocol_maps = np.stack([to_protocol(map_to_original(x.numpy(), o, pre), protocol)
                                  for x, o in zip(maps, originals)])
        v = compute_metrics(image_scores(maps, 0.01).numpy(), labels, protocol_maps, masks).values
        per = [f"{k}:{pixel_metrics(protocol_maps[rows], masks[rows]).values['pixel_aupro']:.3f}"
               for k in sorted(set(kinds[labels == 1])) for rows in [(kinds == k) | (labels == 0)]]
        print(f"{name:24s}", " ".join(f"{v[k]:.3f}" for k in KEYS), "|", " ".join(per), flush=True)

    print(f"{'novelty term':24s}", " ".join(KEYS), "| AUPRO per defect type", flush=True)
    usual = distances(z0, train, size)
    report("fit's (3x3)", term(usual))
    for clip in (3.0, 4.0):
        report(f"clip {clip:g}", term(usual, clip=clip))
    for sigma in (0.5, 2.0):
        report(f"blur sigma {sigma:g}", term(usual, sigma=sigma))
    for k in (1, 5):
        with neighbourhood(k):
            report(f"{k}x{k} neighbourhood", term(distances(z0, train, size)))
    coarse = term(distances(F.avg_pool2d(z0, 2), F.avg_pool2d(train, 2), size))
    report("coarse grid", coarse)
    report("max(usual, coarse)", torch.maximum(term(usual), coarse))
    finer = term(distances(fine_z0, fine_train, size))
    report("2x resolution", finer)
    report("mean(usual, 2x res.)", (term(usual) + finer) / 2)


if __name__ == "__main__":
    main()
