"""Ablations of the inference-time choices of a trained bundle (paper Tables 3 and 4).

For one bundle and one MVTec-layout category, each test image is encoded and decoded
once; the correction is run once per (strategy, steps) variant; maps are then built for
every (combination, clip) variant from those tensors and scored with the same metric
code as `decodiff benchmark`. Prints one line per variant and writes JSON.

    python benchmarks/ablate_maps.py BUNDLE ../shared/data/mvtec_bottle/bottle --protocol paper --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from decodiff_cli.anomaly_map import anomaly_maps
from decodiff_cli.benchmark import PROTOCOLS, _protocol_mask, discover, to_protocol
from decodiff_cli.config import CorrectionConfig
from decodiff_cli.detector import Detector
from decodiff_cli.deviation import correct
from decodiff_cli.images import load_image, map_to_original
from decodiff_cli.metrics import compute_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("category_dir", type=Path)
    parser.add_argument("--protocol", default="paper", choices=sorted(PROTOCOLS))
    parser.add_argument("--steps", default="5,3,1", help="comma-separated numbers of model calls")
    parser.add_argument("--strategies", default="z_{t-1},z0")
    parser.add_argument("--combines", default="geometric,arithmetic,pixel,latent")
    parser.add_argument("--latent-clips", default="0.2,0.5,1.0")
    parser.add_argument("--pixel-clips", default="0.2,0.4")
    parser.add_argument("--latent-sigmas", default="1.0", help="blur of the latent map, latent pixels")
    parser.add_argument("--pixel-sigmas", default="3.0", help="blur of the pixel map, image pixels")
    parser.add_argument("--class-name", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    detector = Detector.load(args.bundle, device="cpu", batch_size=8)
    model, cfg = detector.model, detector.bundle.config
    category = discover(args.category_dir)[0]
    name = args.class_name or (category.name if category.name in detector.categories else detector.categories[0])
    labels = detector._labels(name, 1)
    pre = cfg.preprocess
    same_geometry = PROTOCOLS[args.protocol] == (pre.resize, pre.image_size)

    began = time.perf_counter()
    loaded = [load_image(s.image, pre) for s in category.samples]
    masks = np.stack([_protocol_mask(s, args.protocol) for s in category.samples])
    image_labels = np.array([s.label for s in category.samples])
    tensors = torch.stack([im.tensor for im in loaded])
    z0 = torch.cat([model.encode(chunk) for chunk in tensors.split(8)])
    recon = torch.cat([model.decode(chunk) for chunk in z0.split(8)])

    def eps_theta(z, t):
        lab = None if labels is None else labels.expand(len(z))
        return model.denoiser(z, t, lab).float()

    results = []
    for strategy, steps in itertools.product(args.strategies.split(","), [int(s) for s in args.steps.split(",")]):
        timesteps = replace(CorrectionConfig(), num_calls=steps, strategy=strategy).timesteps()
        z0_hat = torch.cat([correct(eps_theta, chunk, model.abar, timesteps, strategy) for chunk in z0.split(8)])
        corrected = torch.cat([model.decode(chunk) for chunk in z0_hat.split(8)])
        floats = lambda text: [float(c) for c in text.split(",")]  # noqa: E731
        for combine, lclip, pclip, lsig, psig in itertools.product(
                args.combines.split(","), floats(args.latent_clips), floats(args.pixel_clips),
                floats(args.latent_sigmas), floats(args.pixel_sigmas)):
            if (combine == "pixel" and lclip != float(args.latent_clips.split(",")[0])) or \
               (combine == "latent" and pclip != float(args.pixel_clips.split(",")[0])):
                continue  # the unused clip does not matter
            map_cfg = replace(cfg.anomaly_map, combine=combine, latent_clip=lclip, pixel_clip=pclip,
                              latent_sigma=lsig, pixel_sigma=psig)
            maps = anomaly_maps(z0, z0_hat, recon, corrected, map_cfg, tensors.shape[-2:]).numpy()
            if not same_geometry:
                maps = np.stack([to_protocol(map_to_original(m, im.original_size, pre), args.protocol)
                                 for m, im in zip(maps, loaded)])
            values = compute_metrics(maps.reshape(len(maps), -1).max(1), image_labels, maps, masks).values
            row = {"strategy": strategy, "steps": steps, "combine": combine, "latent_clip": lclip,
                   "pixel_clip": pclip, "latent_sigma": lsig, "pixel_sigma": psig, **{k: round(float(v), 4) for k, v in values.items()}}
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"# {len(results)} variants in {time.perf_counter() - began:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
