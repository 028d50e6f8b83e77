"""`decodiff fit` as a library call: images -> cached latents -> trained denoiser ->
calibrated thresholds -> bundle.

``fit`` runs named steps; those that measure return what they measured (the latent
scaling, ``FitStatistics``, the normal reference and banks) rather than editing settings.

Reports progress through a ``FitProgress`` (progress.py: one method per event) and never prints, so the
CLI decides how things look and tests can run it directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from decodiff_cli import __version__
from decodiff_cli.anomaly_map import alignment, feature_scales, identity_reference, latent_difference, normal_reference
from decodiff_cli.autoencoders import describe, load_autoencoder
from decodiff_cli.bundle import write_bundle
from decodiff_cli.calibration import labelled_thresholds, make_calibration, normal_thresholds, subsample_pixels
from decodiff_cli.config import FitStatistics, LatentScaling, ModelConfig, PreprocessConfig, TrainConfig, auto_shape
from decodiff_cli.datasets import find_mask
from decodiff_cli.denoiser import LATENT_MULTIPLE
from decodiff_cli.images import ImageReadError, image_size, load_image, read_image
from decodiff_cli.latent_cache import build_cache, cache_key
from decodiff_cli.latents import STANDARDISED, LatentScaler, fit_scaling
from decodiff_cli.novelty import normal_bank, novelty_scale, position_scale, position_statistics
from decodiff_cli.progress import NO_PROGRESS, FitProgress

MIN_IMAGES = 4  # per category: at least 3 to train on and 1 to calibrate with

Skip = Callable[[str, str], None]  # (path, reason) of an input left out


class _LostImage(Exception):
    """A training image that read at the check but not when encoded (changed since)."""

    def __init__(self, index: int, error: ImageReadError) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


@dataclass
class FitResult:
    bundle: Path
    steps: int
    seconds: float
    categories: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    is_main_process: bool = True  # False on the other ranks of a multi-process run


def work_dir_for(out: Path) -> Path:
    """Checkpoints and the latent cache live beside the bundle until it is written."""
    return out.parent / f"{out.name}.work"


ENCODING_SHARE = 0.25  # of a time budget, at most, for augmented views beyond the first


def encoding_limit(minutes: float) -> float | None:
    """Extra augmented views are encoded only while they fit in a quarter of the budget:
    with a short budget, steps on the original images are worth more than more views."""
    return minutes * 60 * ENCODING_SHARE if minutes > 0 else None


def training_budget(minutes: float, spent_s: float, progress: FitProgress = NO_PROGRESS, after_s: float = 0.0) -> float:
    """Seconds left for training once images are read and encoded, and ``after_s`` (the
    estimated cost of what follows training) kept aside (0: no budget). At least a tenth of
    the budget is always trained, even if the rest overran it."""
    if minutes <= 0:
        return 0.0
    left = max(minutes * 60 - spent_s - after_s, minutes * 6)
    if spent_s + after_s > minutes * 30:
        progress.budget_warning(minutes=minutes, spent_s=spent_s, after_s=after_s, training_s=left)
    return left


WRITE_BYTES_PER_S = 100e6  # a conservative disk: the bundle's weights are written once


def after_training_seconds(cfg: ModelConfig, autoencoder, device, holdout: dict[str, list[Path]], anomalous: int,
                           cache, labels: list[int], categories: list[str], banks) -> float:
    """What fit() does after training, estimated from its measured cost per image: the
    map's normal statistics (a correction and two decodes per image), the calibration (a
    full inference per held-out or labelled image) and writing the bundle. Measured with an
    untrained denoiser of the same size: the cost does not depend on the weights."""
    import copy

    from decodiff_cli.denoiser import Denoiser
    from decodiff_cli.model import DecoDiffModel

    timing = copy.deepcopy(cfg)
    map_cfg = timing.anomaly_map
    map_cfg.reference = "none"  # statistics not measured yet; the z-score costs nothing extra
    levels = len(autoencoder.feature_stages()[: map_cfg.feature_levels or None])
    timing.measured.feature_scales = {name: [1.0] * levels for name in categories}
    timing.measured.novelty_scales = {name: [1.0] * (len(map_cfg.novelty_windows) + map_cfg.novelty_positions)
                                      for name in categories}
    denoiser = Denoiser(timing.denoiser)
    model = DecoDiffModel(timing, autoencoder, denoiser, device, normal_latents=banks)
    items = [(categories.index(name), path) for name, paths in sorted(holdout.items()) for path in paths]
    ids = [index for index, _ in items[:5]]
    images = [load_image(path, cfg.preprocess).tensor for _, path in items[:5]]
    infer_images(model, images[:1], ids[0])  # the first call pays one-time costs (allocation, kernels)
    clock = time.monotonic()
    if len(images) > 1 and cfg.preprocess.tiles:
        for image, index in zip(images[1:], ids[1:]):
            infer_images(model, [image], index)
    elif len(images) > 1:
        model.infer(torch.stack(images[1:]), torch.tensor(ids[1:]))
    per_image = (time.monotonic() - clock) / max(1, len(images) - 1) if len(images) > 1 else time.monotonic() - clock
    seconds = per_image * (sum(map(len, holdout.values())) + anomalous)

    map_cfg = cfg.anomaly_map
    reference_images = sum(min(labels.count(i), REFERENCE_IMAGES) for i, name in enumerate(categories)
                           if map_cfg.features or cfg.has_own_reference(name))
    if reference_images:
        z0 = _first_views(cache, torch.arange(min(2, cache.num_images)), model.scaler).to(model.device)
        clock = time.monotonic()
        z0_hat = model.correct(z0, torch.zeros(len(z0), dtype=torch.long))
        if map_cfg.features:
            model.decode_pairs(z0, z0_hat, features=True, images=False)
        seconds += (time.monotonic() - clock) / len(z0) * reference_images
    weights = sum(v.numel() * 4 for v in list(autoencoder.state_dict().values()) + list(denoiser.state_dict().values()))
    weights += sum(bank.numel() * 2 for bank in (banks or {}).values())
    return seconds + weights / WRITE_BYTES_PER_S


def _first_views(cache, rows: torch.Tensor, scaler: LatentScaler) -> torch.Tensor:
    """Normalised latents of the given images, view 0 (the image itself; the posterior's mean)."""
    return scaler.normalize(cache.means(cache.batch(rows, torch.zeros_like(rows))).float())


def class_centroids(cache, labels: list[int], categories: list[str], scaler: LatentScaler) -> dict[str, list[float]]:
    """Mean normalised latent of each category, pooled over space (first view of each
    image, read one at a time: the cache may be larger than RAM)."""
    pooled = torch.stack([_first_views(cache, torch.tensor([i]), scaler).mean(dim=(0, 2, 3))
                          for i in range(cache.num_images)])
    label_tensor = torch.tensor(labels)
    return {name: pooled[label_tensor == index].mean(dim=0).tolist() for index, name in enumerate(categories)}


REFERENCE_IMAGES = 64  # per class, evenly spaced over its training images


def _spread_rows(labels: list[int], index: int) -> torch.Tensor:
    """Up to REFERENCE_IMAGES training images of class ``index``, evenly spaced."""
    rows = (torch.tensor(labels) == index).nonzero()[:, 0]
    return rows[torch.linspace(0, len(rows) - 1, min(len(rows), REFERENCE_IMAGES)).round().long().unique()]


def class_alignment(cache, labels: list[int], categories: list[str], scaler: LatentScaler) -> dict[str, float]:
    """anomaly_map.alignment of each class's training latents (first view)."""
    return {name: round(alignment(_first_views(cache, _spread_rows(labels, index), scaler)), 4)
            for index, name in enumerate(categories)}


def normal_statistics(model, cache, labels: list[int], categories: list[str]) -> tuple[torch.Tensor | None, dict[str, list[float]]]:
    """What the map measures against, from the trained model's corrections of training
    images (first view, already encoded; the held-out ones stay unseen, for the thresholds):
    - the (classes, 2, h, w) normal reference of the latent term, when the map uses one;
      classes that "auto" found unaligned get the identity reference (the paper's map);
    - per class, the scales of the decoder-feature levels, when the map has that term."""
    map_cfg = model.cfg.anomaly_map
    size = model.cfg.denoiser.latent_shape
    use_reference = map_cfg.reference != "none"
    references, scales = [], {}
    for index, name in enumerate(categories):
        own_reference = model.cfg.has_own_reference(name)
        differences, levels = [], []
        if own_reference or map_cfg.features:
            for z0 in _first_views(cache, _spread_rows(labels, index), model.scaler).to(model.device).split(16):
                z0_hat = model.correct(z0, torch.full((len(z0),), index))
                differences.append(latent_difference(z0_hat, z0).cpu())
                if map_cfg.features:
                    levels.append([level.cpu() for level in model.decode_pairs(z0, z0_hat, features=True, images=False)[2]])
        if use_reference:
            references.append(normal_reference(torch.cat(differences)) if own_reference
                              else identity_reference(map_cfg, size))
        if map_cfg.features:
            scales[name] = [round(x, 6) for x in feature_scales([torch.cat(level) for level in zip(*levels)])]
    return (torch.stack(references) if use_reference else None), scales


def normal_latents(cache, labels: list[int], categories: list[str], scaler: LatentScaler, size: int, windows: list[int],
                   positions: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float | list[float]]]:
    """The novelty term's normal statistics, per class: its bank of up to ``size`` normal
    latent vectors, drawn from all its training images (first view), and the unit of its distances,
    measured on up to REFERENCE_IMAGES of them (novelty.novelty_scale). With ``positions``, also
    the class's per-position statistics (key "<class>/positions") and their unit, the last one."""
    banks, scales = {}, {}
    label_tensor = torch.tensor(labels)

    def first_views(rows: torch.Tensor) -> torch.Tensor:
        return _first_views(cache, rows, scaler)

    for index, name in enumerate(categories):
        images = (label_tensor == index).nonzero()[:, 0]
        bank, owner = normal_bank(first_views, images, size, windows=windows)
        rows = _spread_rows(labels, index)
        latents = first_views(rows)
        banks[name] = bank
        scale = novelty_scale(latents, rows, bank, owner, windows)
        units = scale if isinstance(scale, list) else [scale]
        if positions:
            banks[f"{name}/positions"] = statistics = position_statistics(first_views, images)
            units = units + [position_scale(latents, statistics, len(images))]
        scales[name] = round(units[0], 6) if len(units) == 1 else [round(x, 6) for x in units]
    return banks, scales


def measure_scaling(cache, scaling: LatentScaling) -> LatentScaling:
    """The latent scaling's statistics, from the first view of every training image
    (a "factor" scaling that already has them is kept)."""
    if scaling.kind not in STANDARDISED and scaling.mean:
        return scaling
    # np.array copies: a read-only memmap slice handed to torch.from_numpy warns.
    first_views = torch.from_numpy(np.array(cache.latents[:, 0])).float() if cache.on_disk else cache.latents[:, 0].float()
    return fit_scaling(cache.means(first_views), scaling.kind, scaling.factor)


def measure_latents(cache, labels: list[int], categories: list[str], cfg: ModelConfig) -> FitStatistics:
    """What the training latents alone tell (no trained model needed): the class centroids
    of a model of several classes, and each class's alignment when the reference is "auto"."""
    scaler = LatentScaler(cfg.latent_scaling)
    return FitStatistics(
        class_centroids=class_centroids(cache, labels, categories, scaler) if len(categories) > 1 else {},
        alignment=class_alignment(cache, labels, categories, scaler) if cfg.anomaly_map.reference == "auto" else {},
    )


def record_training(train_cfg: TrainConfig, result, views: int) -> TrainConfig:
    """The training settings that replay this model: --max-steps (the schedule's length)
    [--stop-step] --views --seed, with the steps it was trained for."""
    record = dataclasses.replace(train_cfg, steps_done=result.steps, augment_variants=views)
    if train_cfg.time_budget_minutes > 0:
        record.max_steps = result.schedule_steps
        if result.steps != result.schedule_steps:  # cut short by the clock, or continued at the final rate
            record.stop_step = result.steps
    return record


def median_aspect(paths: list, sample: int = 32) -> float | None:
    """The median width / height of up to `sample` evenly spaced images (headers only)."""
    ratios = []
    for path in paths[:: max(1, len(paths) // sample)]:
        try:
            width, height = image_size(path)
        except Exception:  # not a file, or unreadable: the ratio is a hint, not a rule
            continue
        ratios.append(width / height)
    return float(np.median(ratios)) if ratios else None


def choose_shape(aspects: dict[str, float | None], pre: PreprocessConfig, multiple: int, report) -> PreprocessConfig:
    """`--image-size auto`: the input shape for the classes' median aspect ratios; with a
    fixed square, a hint where the images are elongated."""
    known = [a for a in aspects.values() if a is not None]
    if pre.image_height or pre.tiles or not known:  # a shape the user gave, or tiles: nothing is squeezed
        return pre
    if pre.auto_shape:
        aspect = float(np.median(known))
        width, height = auto_shape(aspect, pre.image_size, multiple)
        if height:
            report.note(f"the images are {aspect:.2f}:1 (median): the model sees {width}x{height}, about the "
                        f"same pixels as {pre.image_size}x{pre.image_size} (--image-size {pre.image_size} keeps a square)")
            return replace(pre, image_size=width, resize=width, image_height=height)
        return pre
    for name, aspect in aspects.items():
        width, height = auto_shape(aspect, pre.image_size, multiple) if aspect is not None else (0, 0)
        if height:
            report.note(f"class {name!r}: the images are {aspect:.2f}:1 (median) and will be squeezed into "
                        f"{pre.image_size}x{pre.image_size}; --image-size {width}x{height} (or auto) keeps their shape")
    return pre


def split_holdout(paths: list[Path], fraction: float, minimum: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, holdout): at least `minimum` held out, but never more than a third."""
    count = min(max(minimum, round(fraction * len(paths))), len(paths) // 3) if fraction > 0 else 0
    order = list(paths)
    random.Random(seed).shuffle(order)
    return sorted(order[count:]), sorted(order[:count])


def usable_images(paths: list[Path], cfg: ModelConfig, strict: bool) -> tuple[list[Path], list[tuple[str, str]]]:
    """The paths that decode, and (path, reason) for the others. Nothing is kept in memory:
    images are decoded again when encoded, so datasets larger than RAM still train."""
    usable, skipped = [], []
    for path in paths:
        try:
            read_image(path)
            usable.append(path)
        except ImageReadError as err:
            if strict:
                raise ValueError(f"{err} (--strict stops at the first unreadable file)") from None
            skipped.append((str(path), str(err)))
    return usable, skipped


def fit(
    images: dict[str, list[Path]],
    out: Path,
    cfg: ModelConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    strict: bool = False,
    class_conditional: bool | None = None,
    anomalous: list[Path] | None = None,
    accelerator=None,
    progress: FitProgress | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> FitResult:
    """``should_stop(step)``: see training.train; True stops with a resumable checkpoint."""
    from accelerate import Accelerator

    from decodiff_cli.training import train

    out = Path(out)
    if out.exists() and not overwrite and not resume:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    cfg.train.mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a GPU; use bf16 or no on a CPU")
    accelerator = accelerator or Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=max(1, cfg.train.gradient_accumulation_steps),
        cpu=cpu_only_launch(),
    )
    main = accelerator.is_main_process
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        # Every process would think it is the only one: N identical runs racing to
        # write the same bundle and delete the same work folder.
        raise ValueError(f"launched as {launched} processes, but accelerate sees {accelerator.num_processes}")
    # Progress comes from the main process only: N copies of every message help nobody.
    report = (progress or NO_PROGRESS) if main else NO_PROGRESS
    work = work_dir_for(out)
    if resume and not (work / "checkpoint" / "trainer_state.json").is_file():
        raise ValueError(f"nothing to resume: no checkpoint in {work / 'checkpoint'}")

    began = time.monotonic()  # --time-budget covers reading and encoding too
    autoencoder = load_autoencoder(cfg.autoencoder.spec).to(accelerator.device)  # fails fast when offline
    if cfg.anomaly_map.features and not autoencoder.feature_stages():
        cfg.anomaly_map.features = False
        report.note(f"autoencoder {cfg.autoencoder.spec!r} has no decoder features: the map goes without its feature term")

    # 1. images: readable ones, split into training and held-out sets per category
    categories = sorted(images)
    train_paths, labels, holdout, skipped, aspects = [], [], {}, [], {}

    def skip(path: str, reason: str) -> None:
        if strict:
            raise ValueError(f"{reason} (--strict stops at the first unreadable file)")
        skipped.append((path, reason))
        report.skipped(path, reason)

    for index, name in enumerate(categories):
        usable, bad = usable_images(images[name], cfg, strict)
        for path, reason in bad:
            skip(path, reason)
        if len(usable) < MIN_IMAGES:
            raise ValueError(f"class {name!r} has {len(usable)} usable image(s); at least {MIN_IMAGES} are needed")
        train_part, holdout[name] = split_holdout(usable, cfg.train.holdout_fraction, cfg.train.min_holdout, cfg.train.seed)
        train_paths += train_part
        labels += [index] * len(train_part)
        aspects[name] = median_aspect(usable)
    cfg.preprocess = choose_shape(aspects, cfg.preprocess, autoencoder.downsample * LATENT_MULTIPLE, report)
    report.images(train=len(train_paths), holdout=sum(map(len, holdout.values())), categories=categories, skipped=skipped)

    # 2. the frozen autoencoder (loaded above), and every training view encoded once
    spec = cfg.autoencoder.spec
    cfg.autoencoder = describe(autoencoder, spec)
    cfg.categories = categories
    if class_conditional is None:
        class_conditional = len(categories) > 1  # a unified model sees the category by default
    cfg.denoiser.num_classes = len(categories) if class_conditional else 0
    cfg.decodiff_version = __version__
    cfg.denoiser.latent_channels = autoencoder.latent_channels
    height, width = cfg.preprocess.shape
    multiple = autoencoder.downsample * LATENT_MULTIPLE  # the UNet halves the latent twice
    if height % multiple or width % multiple:
        raise ValueError(f"--image-size: each side must be a multiple of {multiple} (the autoencoder's "
                         f"{autoencoder.downsample}x downsampling, then the denoiser's {LATENT_MULTIPLE}x), not {width}x{height}")
    cfg.denoiser.latent_size = width // autoencoder.downsample
    cfg.denoiser.latent_height = height // autoencoder.downsample if cfg.preprocess.image_height else 0
    if resume:
        check_resumable(work / "config.json", cfg)
    work.mkdir(parents=True, exist_ok=True)

    def encoded(i: int) -> torch.Tensor:
        try:
            return load_image(train_paths[i], cfg.preprocess).tensor
        except ImageReadError as err:
            raise _LostImage(i, err) from None

    while True:  # again without any image that changed after the check (each encoding reads the files)
        key = cache_key(train_paths, cfg.preprocess, cfg.train, spec)
        try:
            with accelerator.local_main_process_first():
                cache = build_cache(encoded, len(train_paths), autoencoder, cfg.train, accelerator.device,
                                    folder=work / "cache", key=key,
                                    time_limit_s=encoding_limit(cfg.train.time_budget_minutes),
                                    progress=report.encoding, tile=cfg.preprocess.shape if cfg.preprocess.tiles else None)
            break
        except _LostImage as lost:
            skip(str(train_paths[lost.index]), str(lost.error))
            name = categories[labels.pop(lost.index)]
            del train_paths[lost.index]
            if name not in [categories[i] for i in labels]:
                raise ValueError(f"class {name!r} has no readable training image left") from None
    report.cache(nbytes=cache.nbytes, on_disk=cache.on_disk, images=cache.num_images, views=int(cache.latents.shape[1]))
    cfg.latent_scaling = measure_scaling(cache, cfg.latent_scaling)
    cfg.measured = measure_latents(cache, labels, categories, cfg)
    if cfg.anomaly_map.reference == "auto":
        # random tiles have no common positions to keep a reference for
        aligned = [name for name in categories if cfg.has_own_reference(name) and not cfg.preprocess.tiles]
        cfg.anomaly_map.reference = "position" if aligned else "none"
        report.alignment(cfg.measured.alignment, aligned)

    # The novelty term's normal latents need no trained model: stored before training, so
    # that a time budget knows what is left after it.
    banks = None
    if main and cfg.anomaly_map.novelty:
        report.novelty(images=len(labels))
        scaler = LatentScaler(cfg.latent_scaling)
        banks, cfg.measured.novelty_scales = normal_latents(cache, labels, categories, scaler, cfg.anomaly_map.novelty_bank,
                                                           cfg.anomaly_map.novelty_windows, cfg.anomaly_map.novelty_positions)
    labelled = load_anomalous(anomalous or [], cfg, categories, skip) if main else {}
    after_s = 0.0
    if main and cfg.train.time_budget_minutes > 0:
        after_s = after_training_seconds(cfg, autoencoder, accelerator.device, holdout, sum(map(len, labelled.values())),
                                         cache, labels, categories, banks)

    # 3. train
    log_file = work / "training_log.jsonl"
    if main and not resume:
        log_file.unlink(missing_ok=True)
        (work / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    result = train(cfg, cache, torch.tensor(labels), accelerator, work / "checkpoint", resume=resume,
                   progress=report.step, log_file=log_file, should_stop=should_stop,
                   budget_s=training_budget(cfg.train.time_budget_minutes, time.monotonic() - began, report, after_s))
    cfg.train = record_training(cfg.train, result, views=int(cache.latents.shape[1]))

    # 4. calibrate on the held-out images, write the bundle (one writer)
    calibration: dict[str, Any] = {}
    if main:
        from decodiff_cli.denoiser import Denoiser
        from decodiff_cli.model import DecoDiffModel

        denoiser = Denoiser(cfg.denoiser)
        denoiser.load_state_dict(result.denoiser_state)
        model = DecoDiffModel(cfg, autoencoder, denoiser, accelerator.device, normal_latents=banks)
        if cfg.anomaly_map.reference != "none" or cfg.anomaly_map.features:
            report.reference(images=sum(min(labels.count(i), REFERENCE_IMAGES) for i, name in enumerate(categories)
                                        if cfg.anomaly_map.features or cfg.has_own_reference(name)))
            model.reference, cfg.measured.feature_scales = normal_statistics(model, cache, labels, categories)
        report.calibrate(images=sum(map(len, holdout.values())))
        calibration = calibrate_model(model, holdout, labelled, skip)
        write_bundle(out, cfg, result.denoiser_state, autoencoder.state_dict(), calibration, log_file,
                     overwrite=overwrite or resume, reference=model.reference, normal_latents=banks)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return FitResult(bundle=out, steps=result.steps, seconds=result.seconds, categories=categories,
                     skipped=skipped, calibration=calibration, is_main_process=main)


def resolve_mixed_precision(requested: str) -> str:
    """"auto": bf16 where the hardware computes it natively (model.native_bf16; on such a CPU
    1.5x the steps in a 30-minute fit here), else full precision."""
    if requested != "auto":
        return requested
    from decodiff_cli.model import native_bf16, resolve_device

    return "bf16" if native_bf16(resolve_device("auto")) else "no"


def check_resumable(saved_file: Path, cfg: ModelConfig) -> None:
    """--resume rebuilds the settings from the command line, so they must describe the
    model the checkpoint holds: same image geometry, autoencoder, denoiser and classes
    (training options such as --max-steps or --time-budget may change). Without this a
    forgotten --model-size ends in a page of tensor size mismatches."""
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
        return  # no record of the interrupted run's settings: the checkpoint load decides
    current = cfg.to_dict()
    changed = [f"{section}.{key} {saved[section][key]!r} -> {value!r}"
               for section in ("preprocess", "denoiser") for key, value in current[section].items()
               if isinstance(saved.get(section), dict) and key in saved[section] and saved[section][key] != value]
    for label, before, now in (("autoencoder", saved.get("autoencoder", {}).get("spec"), cfg.autoencoder.spec),
                               ("classes", saved.get("categories"), cfg.categories)):
        if before is not None and before != now:
            changed.append(f"{label} {before!r} -> {now!r}")
    if changed:
        raise ValueError(f"cannot resume from {saved_file.parent / 'checkpoint'}: it was made with other settings "
                         f"({'; '.join(changed)}); repeat the options of the interrupted run")


def cpu_only_launch() -> bool:
    """True for a multi-process launch (torchrun, `accelerate launch --multi_gpu`) on a
    machine without any accelerator. accelerate forms a CPU process group (gloo) only
    when told it runs on the CPU; otherwise each process trains alone, believing it is
    the main one. (`accelerate launch --cpu --num_processes N` starts one process unless
    given an mpirun hostfile; `--multi_gpu` without a GPU starts N, hence this.)"""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6: any device kind
    if probe is not None:
        return probe.current_accelerator() is None
    return not torch.cuda.is_available()


def _report(skip: Skip | None, path: Path, err: ImageReadError) -> None:
    if skip is None:
        raise err
    skip(str(path), str(err))


def load_anomalous(paths: list[Path], cfg: ModelConfig, categories: list[str],
                   skip: Skip | None = None) -> dict[str, list[tuple[torch.Tensor, np.ndarray | None]]]:
    """Labelled anomalies per category (from the path, or the only category), with masks if
    found. One that cannot be read (image or mask) is left out through ``skip``, or raises."""
    from decodiff_cli.images import mask_to_model_space

    result: dict[str, list] = {}
    for path in paths:
        names = [part for part in path.parts if part in categories]
        if not names and len(categories) > 1:
            raise ValueError(f"{path}: cannot tell which class this anomaly belongs to (no class folder in its path)")
        mask_path = find_mask(path)
        try:
            mask = mask_to_model_space(mask_path, cfg.preprocess) if mask_path else None
            tensor = load_image(path, cfg.preprocess).tensor
        except ImageReadError as err:
            _report(skip, path, err)
            continue
        result.setdefault(names[-1] if names else categories[0], []).append((tensor, mask))
    return result


def infer_images(model, images: list[torch.Tensor], class_id: int) -> list:
    """Inferences of preprocessed images of one class: one batch, or with tiles one
    stitched image at a time (tiles.py)."""
    ids = lambda n: torch.full((n,), class_id)  # noqa: E731
    if not model.cfg.preprocess.tiles:
        return [model.infer(torch.stack(images), ids(len(images)))]
    from decodiff_cli.tiles import infer_frame

    return [infer_frame(lambda tiles: model.infer(tiles, ids(len(tiles))), image, model.cfg.preprocess,
                        model.cfg.anomaly_map.score_top_fraction) for image in images]


def calibrate_model(model, holdout: dict[str, list[Path | torch.Tensor]],
                    anomalous: dict[str, list[tuple[torch.Tensor, np.ndarray | None]]] | None = None,
                    skip: Skip | None = None) -> dict[str, Any]:
    """Thresholds per category from held-out normals (and labelled anomalies, if any). A
    held-out file that cannot be read (any more) is left out through ``skip``, or raises."""
    categories = model.cfg.categories
    anomalous = anomalous or {}

    def readable(items: list[Path | torch.Tensor]) -> list[torch.Tensor]:  # paths are read only when needed
        out = []
        for item in items:
            if isinstance(item, torch.Tensor):
                out.append(item)
                continue
            try:
                out.append(load_image(item, model.cfg.preprocess).tensor)
            except ImageReadError as err:
                _report(skip, item, err)
        return out

    def run(name: str, items: list[Path | torch.Tensor]) -> tuple[np.ndarray, list[np.ndarray]]:
        scores, maps = [], []
        for start in range(0, len(items), 8):
            loaded = readable(items[start : start + 8])
            if not loaded:
                continue
            for out in infer_images(model, loaded, categories.index(name)):
                scores.append(out.scores.numpy())
                maps += list(out.maps.numpy())
        if not scores:
            raise ValueError(f"class {name!r}: none of its normal images for calibration could be read")
        return np.concatenate(scores), maps

    per_category = {}
    for name, tensors in sorted(holdout.items()):
        if not tensors:
            raise ValueError(f"class {name!r}: no normal images to calibrate with")
        scores, maps = run(name, tensors)
        normal_pixels = subsample_pixels(maps)
        if not anomalous.get(name):
            per_category[name] = normal_thresholds(scores, normal_pixels)
            continue
        bad_scores, bad_maps = run(name, [t for t, _ in anomalous[name]])
        masked = [(m, mask) for m, (_, mask) in zip(bad_maps, anomalous[name]) if mask is not None]
        pixel_scores = pixel_labels = None
        if masked:
            pixel_scores = np.concatenate([subsample_pixels(maps)] + [m.ravel() for m, _ in masked])
            pixel_labels = np.concatenate([np.zeros(pixel_scores.size - sum(m.size for m, _ in masked), bool)]
                                          + [k.ravel() for _, k in masked])
        per_category[name] = labelled_thresholds(scores, normal_pixels, bad_scores, pixel_scores, pixel_labels)
    return make_calibration(per_category)


def recalibrate(bundle_path: Path, normal: dict[str, list[Path]], anomalous: list[str], device: str = "auto",
                skip: Skip | None = None) -> dict[str, Any]:
    """`decodiff calibrate`: new thresholds for an existing bundle, no retraining. Files
    that cannot be read are left out and reported through ``skip`` (anomalies raise without it)."""
    from decodiff_cli.bundle import write_calibration
    from decodiff_cli.detector import Detector

    detector = Detector.load(bundle_path, device=device)
    cfg = detector.bundle.config
    holdout: dict[str, list[Path]] = {}
    for name, paths in normal.items():
        if name not in cfg.categories:
            if len(cfg.categories) > 1:
                raise ValueError(f"class {name!r} is not in this model ({', '.join(cfg.categories)})")
            name = cfg.categories[0]
        usable, bad = usable_images(paths, cfg, strict=False)
        for path, reason in bad if skip else ():
            skip(path, reason)
        holdout.setdefault(name, []).extend(usable)
    calibration = calibrate_model(detector.model, holdout,
                                  load_anomalous([Path(p) for p in anomalous], cfg, cfg.categories, skip), skip)
    previous = detector.bundle.calibration.get("categories", {})
    calibration["categories"] = {**previous, **calibration["categories"]}
    write_calibration(bundle_path, calibration)
    return calibration
