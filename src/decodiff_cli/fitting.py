"""`decodiff fit` as a library call: images -> cached latents -> trained denoiser ->
calibrated thresholds -> bundle.

Reports progress through a callback (``on_event(kind, info)``) and never prints, so the
CLI decides how things look and tests can run it directly.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from decodiff_cli import __version__
from decodiff_cli.autoencoders import describe, load_autoencoder
from decodiff_cli.bundle import write_bundle
from decodiff_cli.calibration import make_calibration, normal_thresholds, subsample_pixels
from decodiff_cli.config import ModelConfig
from decodiff_cli.images import ImageReadError, load_image
from decodiff_cli.latent_cache import build_cache, cache_key
from decodiff_cli.latents import fit_scaling

MIN_IMAGES = 4  # per category: at least 3 to train on and 1 to calibrate with

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class FitResult:
    bundle: Path
    steps: int
    seconds: float
    categories: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)


def work_dir_for(out: Path) -> Path:
    """Checkpoints and the latent cache live beside the bundle until it is written."""
    return out.parent / f"{out.name}.work"


def split_holdout(paths: list[Path], fraction: float, minimum: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, holdout): at least `minimum` held out, but never more than a third."""
    count = min(max(minimum, round(fraction * len(paths))), len(paths) // 3) if fraction > 0 else 0
    order = list(paths)
    random.Random(seed).shuffle(order)
    return sorted(order[count:]), sorted(order[:count])


def load_usable(paths: list[Path], cfg: ModelConfig, strict: bool) -> tuple[list[Path], list[torch.Tensor], list[tuple[str, str]]]:
    usable, tensors, skipped = [], [], []
    for path in paths:
        try:
            tensors.append(load_image(path, cfg.preprocess).tensor)
            usable.append(path)
        except ImageReadError as err:
            if strict:
                raise ValueError(f"{err} (--strict stops at the first unreadable file)") from None
            skipped.append((str(path), str(err)))
    return usable, tensors, skipped


def fit(
    images: dict[str, list[Path]],
    out: Path,
    cfg: ModelConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    strict: bool = False,
    class_conditional: bool | None = None,
    accelerator=None,
    on_event: Event | None = None,
) -> FitResult:
    from accelerate import Accelerator

    from decodiff_cli.training import train

    emit = on_event or (lambda kind, info: None)
    out = Path(out)
    if out.exists() and not overwrite and not resume:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a GPU; use bf16 or no on a CPU")
    accelerator = accelerator or Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=max(1, cfg.train.gradient_accumulation_steps),
    )
    main = accelerator.is_main_process
    work = work_dir_for(out)
    if resume and not (work / "checkpoint" / "trainer_state.json").is_file():
        raise ValueError(f"nothing to resume: no checkpoint in {work / 'checkpoint'}")

    # 1. images: readable ones, split into training and held-out sets per category
    categories = sorted(images)
    train_paths, train_tensors, labels, holdout, skipped = [], [], [], {}, []
    for index, name in enumerate(categories):
        usable, tensors, bad = load_usable(images[name], cfg, strict)
        skipped += bad
        if len(usable) < MIN_IMAGES:
            raise ValueError(f"class {name!r} has {len(usable)} usable image(s); at least {MIN_IMAGES} are needed")
        train_part, holdout_part = split_holdout(usable, cfg.train.holdout_fraction, cfg.train.min_holdout, cfg.train.seed)
        by_path = dict(zip(usable, tensors))
        train_paths += train_part
        train_tensors += [by_path[p] for p in train_part]
        labels += [index] * len(train_part)
        holdout[name] = [by_path[p] for p in holdout_part]
    emit("images", {"train": len(train_paths), "holdout": sum(map(len, holdout.values())), "skipped": skipped,
                    "categories": categories})

    # 2. the frozen autoencoder, and every training view encoded once
    autoencoder = load_autoencoder(cfg.autoencoder.spec).to(accelerator.device)
    spec = cfg.autoencoder.spec
    cfg.autoencoder = describe(autoencoder, spec)
    cfg.categories = categories
    if class_conditional is None:
        class_conditional = len(categories) > 1  # a unified model sees the category by default
    cfg.denoiser.num_classes = len(categories) if class_conditional else 0
    cfg.decodiff_version = __version__
    cfg.denoiser.latent_channels = autoencoder.latent_channels
    cfg.denoiser.latent_size = cfg.preprocess.image_size // autoencoder.downsample
    if cfg.preprocess.image_size % autoencoder.downsample:
        raise ValueError(f"--image-size must be a multiple of the autoencoder's downsampling ({autoencoder.downsample})")
    work.mkdir(parents=True, exist_ok=True)
    key = cache_key(train_paths, cfg.preprocess, cfg.train, spec)
    with accelerator.local_main_process_first():
        cache = build_cache(train_tensors, len(train_tensors), autoencoder, cfg.train, accelerator.device,
                            folder=work / "cache", key=key,
                            progress=lambda done, total: emit("encode", {"done": done, "total": total}))
    emit("cache", {"bytes": cache.nbytes, "on_disk": cache.on_disk, "images": cache.num_images})
    if cfg.latent_scaling.kind == "channel" or not cfg.latent_scaling.mean:
        first_views = torch.from_numpy(np.asarray(cache.latents[:, 0])).float() if cache.on_disk else cache.latents[:, 0].float()
        cfg.latent_scaling = fit_scaling(first_views, cfg.latent_scaling.kind, cfg.latent_scaling.factor)

    # 3. train
    log_file = work / "training_log.jsonl"
    if main and not resume:
        log_file.unlink(missing_ok=True)
        (work / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    result = train(cfg, cache, torch.tensor(labels), accelerator, work / "checkpoint", resume=resume,
                   progress=lambda record: emit("step", record), log_file=log_file)

    # 4. calibrate on the held-out images, write the bundle (one writer)
    calibration: dict[str, Any] = {}
    if main:
        emit("calibrate", {"images": sum(map(len, holdout.values()))})
        calibration = calibrate_tensors(cfg, autoencoder, result.denoiser_state, holdout, accelerator.device)
        write_bundle(out, cfg, result.denoiser_state, autoencoder.state_dict(), calibration, log_file,
                     overwrite=overwrite or resume)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return FitResult(bundle=out, steps=result.steps, seconds=result.seconds, categories=categories,
                     skipped=skipped, calibration=calibration)


def calibrate_tensors(cfg: ModelConfig, autoencoder, denoiser_state, holdout: dict[str, list[torch.Tensor]],
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Thresholds per category from the held-out normal images (see calibration.py)."""
    from decodiff_cli.denoiser import Denoiser
    from decodiff_cli.model import DecoDiffModel

    denoiser = Denoiser(cfg.denoiser)
    denoiser.load_state_dict(denoiser_state)
    model = DecoDiffModel(cfg, autoencoder, denoiser, torch.device(device))
    per_category = {}
    for index, (name, tensors) in enumerate(sorted(holdout.items())):
        scores, maps = [], []
        for start in range(0, len(tensors), 8):
            chunk = torch.stack(tensors[start : start + 8])
            labels = torch.full((len(chunk),), index) if cfg.denoiser.num_classes else None
            run = model.infer(chunk, labels)
            scores.append(run.scores.numpy())
            maps += list(run.maps.numpy())
        per_category[name] = normal_thresholds(np.concatenate(scores), subsample_pixels(maps))
    return make_calibration(per_category)
