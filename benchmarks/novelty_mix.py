"""The novelty term's three choices, on one bundle's weights: how the bank is chosen (an
equal random share of the training images' vectors, or novelty.covering of them), the
term's weight in the map, and the image score (the map's maximum, or the mean of its top
1%).

Runs the bundle's correction map (its novelty term off) once over the test images of one
MVTec-layout category and encodes its training images, caching both in CACHE.pt; then
builds each bank from those training latents, measures the unit of its distances as fit
does, and scores each mix with the same metric code as `decodiff benchmark`.

    python benchmarks/novelty_mix.py BUNDLE CATEGORY_DIR PROTOCOL CACHE.pt [BANK_SIZE]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from decodiff_cli import novelty
from decodiff_cli.anomaly_map import image_scores, novelty_discrepancy
from decodiff_cli.benchmark import _protocol_mask, discover, to_protocol
from decodiff_cli.detector import Detector
from decodiff_cli.fitting import _spread_rows
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics, image_metrics

KEYS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]
WEIGHTS = (0.5, 2 / 3, 0.8, 1.0)  # 1: the novelty term alone


def train_images(category_dir: Path) -> list[Path]:
    return sorted(p for p in (category_dir / "train" / "good").iterdir() if p.is_file())


def encode_all(detector: Detector, paths: list[Path], pre) -> torch.Tensor:
    """The images' latents (fp16), as the bundle's model encodes them under ``pre``."""
    return torch.cat([detector.model.encode(torch.stack([load_image(p, pre).tensor for p in paths[i:i + 8]])).half()
                      for i in range(0, len(paths), 8)])


def cache_tensors(detector: Detector, category_dir: Path, samples, cache: Path) -> dict[str, torch.Tensor]:
    if cache.is_file():
        return torch.load(cache)
    model, pre = detector.model, detector.bundle.config.preprocess
    model.cfg = dataclasses.replace(model.cfg, anomaly_map=dataclasses.replace(model.cfg.anomaly_map, novelty=False))
    maps, z0s = [], []
    for i in range(0, len(samples), 8):
        images = torch.stack([load_image(s.image, pre).tensor for s in samples[i:i + 8]])
        z0 = model.encode(images)
        maps.append(model.infer(images, z0=z0).maps)
        z0s.append(z0.half())
    tensors = {"maps": torch.cat(maps), "z0": torch.cat(z0s), "train_z0": encode_all(detector, train_images(category_dir), pre)}
    torch.save(tensors, cache)
    return tensors


def cached_run(bundle: str, category_dir: Path, cache: Path):
    """On one CPU thread: the bundle's Detector, the category's test samples, and the
    cached correction maps, test latents and training latents (float32)."""
    torch.set_num_threads(1)
    detector = Detector.load(bundle, device="cpu")
    samples = discover(category_dir)[0].samples
    tensors = cache_tensors(detector, category_dir, samples, cache)
    return detector, samples, tensors["maps"].float(), tensors["z0"].float(), tensors["train_z0"].float()


@torch.inference_mode()
def main() -> None:
    bundle, category_dir, protocol, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    size = int(sys.argv[5]) if len(sys.argv) > 5 else 65536
    detector, samples, correction_map, z0, train = cached_run(bundle, category_dir, cache)
    pre, m = detector.bundle.config.preprocess, detector.bundle.config.anomaly_map

    originals = [load_image(x.image, pre).original_size for x in samples]
    masks = np.stack([_protocol_mask(x, protocol) for x in samples])
    labels = np.array([x.label for x in samples])
    image_ids = torch.arange(len(train))
    scale_ids = _spread_rows([0] * len(train), 0)  # the images fit measures the unit on

    def bank_of(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "covering":
            return novelty.normal_bank(lambda rows: train[rows], image_ids, size)
        pool, owner = novelty._random_share(lambda rows: train[rows], image_ids, size, torch.Generator().manual_seed(0))
        keep = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:size]
        return pool[keep], owner[keep]

    print(f"{'bank':9s} {'weight':>6s}", " ".join(KEYS), "| top-1% score: image_auroc image_ap", flush=True)
    for kind in ("random", "covering"):
        bank, owner = bank_of(kind)
        unit = novelty.novelty_scale(train[scale_ids], scale_ids, bank, owner)
        term = novelty_discrepancy(novelty.nearest_distance(z0, bank) / unit, m.novelty_clip, m.latent_sigma,
                                   correction_map.shape[-2:])[:, 0]
        for weight in WEIGHTS:
            maps = ((1 - weight) * correction_map + weight * term).clamp(0, 1)
            protocol_maps = np.stack([to_protocol(map_to_original(x.numpy(), o, pre), protocol)
                                      for x, o in zip(maps, originals)])
            v = compute_metrics(protocol_maps.reshape(len(maps), -1).max(1), labels, protocol_maps, masks).values
            top = image_metrics(image_scores(maps, 0.01).numpy(), labels).values
            print(f"{kind:9s} {weight:6.2f}", " ".join(f"{v[k]:.3f}" for k in KEYS),
                  f"| {top['image_auroc']:.3f} {top['image_ap']:.3f}", flush=True)


if __name__ == "__main__":
    main()
