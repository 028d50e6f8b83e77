"""`decodiff fit`, `decodiff calibrate`, `decodiff info`: making and inspecting bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.progress import TextColumn

from decodiff_cli import console
from decodiff_cli.cli.common import DEVICE_OPT, friendly_errors
from decodiff_cli.console import EXIT_CODES_HELP, EXIT_INPUTS_FAILED, EXIT_INTERRUPTED, EXIT_OK
from decodiff_cli.config import ALIGNED_BELOW
from decodiff_cli.distributed import end_process_group_at_exit
from decodiff_cli.presets import PRESETS, build_config, read_config_file
from decodiff_cli.progress import FitProgress

FIT_EPILOG = ("Examples:\n\n"
              "  decodiff fit ./normal --out model\n\n"
              "  decodiff fit mvtec/ --out unified --time-budget 30\n\n"
              "  decodiff fit ./line_scans --out model --image-size 1024x256   # 4:1 images at 4x the default pixels\n\n"
              "  decodiff fit ./wafers --out model --tiles   # 256x256 tiles at the images' own resolution\n\n"
              "  accelerate launch --num_processes 8 -m decodiff_cli fit data/ --out model --preset paper\n\n"
              "Ctrl-C saves a resumable checkpoint in OUT.work/; continue with --resume.\n\n" + EXIT_CODES_HELP)
CALIBRATE_EPILOG = "Example:\n\n  decodiff calibrate model ./more_normal --anomalous ./labelled_defects\n\n" + EXIT_CODES_HELP
INFO_EPILOG = "Example:\n\n  decodiff info model"


@friendly_errors
def fit(
    ctx: typer.Context,
    data: List[str] = typer.Argument(..., help="Folders of normal images (folder name = class), image files, globs, or an MVTec AD / VisA root.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    preset: str = typer.Option("cpu", "--preset", help=f"Starting settings: {', '.join(PRESETS)}."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML (or YAML) file whose keys are these options, plus training and map keys only a file sets (docs/commands.md); command-line values win."),
    autoencoder: Optional[str] = typer.Option(None, "--autoencoder", help="taef2 (packaged, the default; paper preset: stabilityai/sd-vae-ft-ema), pixel (no weights), a hub id, a diffusers folder, a TAESD-family folder (*_encoder.pth/*_decoder.pth) or .safetensors file."),
    model_size: Optional[str] = typer.Option(None, "--model-size", help="Denoiser size: tiny, xs (default), s, m, l, xl."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="auto (default): a 256x256 square, or for images elongated beyond 3:2 their own ratio at about the same pixels (1600x400 -> 512x128); a number: that square; WxH: resized whole to W x H, no crop."),
    tiles: Optional[bool] = typer.Option(None, "--tiles/--no-tiles", help="Cut each image at its own resolution into tiles of --image-size, a quarter overlapping, and stitch their maps: for large images and small defects (an image costs as much as its tiles)."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Resize to this side first; larger than --image-size means a centre crop (paper: 288)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size (split over processes)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW, warm-up + cosine)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Stop after this many epochs."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Finish within this many minutes, everything included (reading, encoding, statistics, calibration); the steps that fit are planned after timing the first ones and recorded in the bundle."),
    stop_step: Optional[int] = typer.Option(None, "--stop-step", min=1, help="Stop after this step, keeping the lr schedule of --max-steps (after it, its final rate): replays a time-budget fit (see `decodiff info`)."),
    views: Optional[int] = typer.Option(None, "--views", min=1, help="Encoded views per training image: the image and shifted copies (default 4; a time budget may encode fewer and records how many)."),
    map_combine: Optional[str] = typer.Option(None, "--map", help="Map combination: geometric (paper), arithmetic (cpu default), pixel or latent."),
    map_reference: Optional[str] = typer.Option(None, "--map-reference", help="position: latent discrepancy as a z-score against normal training images; auto (cpu default): position for aligned classes only; none: the paper's map."),
    map_features: Optional[bool] = typer.Option(None, "--map-features/--no-map-features", help="Add the decoder-feature discrepancy to the map (needs a decoder: not the pixel backend)."),
    map_pixel: Optional[bool] = typer.Option(None, "--map-pixel/--no-map-pixel", help="The pixel term, |D(z0_hat) - D(z0)| in RGB. Off, the decoder runs only as far as the feature term needs."),
    feature_levels: Optional[int] = typer.Option(None, "--feature-levels", min=0, help="The feature term reads the decoder's coarsest N levels (0: all); fewer levels: less decoding."),
    map_novelty: Optional[bool] = typer.Option(None, "--map-novelty/--no-map-novelty", help="Mix the map with each place's latent distance to the nearest normal latent (cpu default, not with --autoencoder pixel; stores the normal latents in the bundle)."),
    novelty_bank: Optional[int] = typer.Option(None, "--novelty-bank", min=1, help="Normal latent vectors kept per class for the novelty term (default 65536; more: better coverage, linearly slower scoring)."),
    novelty_weight: Optional[float] = typer.Option(None, "--novelty-weight", min=0.0, max=1.0, help="The novelty term's share of the map (cpu default 0.67; the correction map has the rest)."),
    score_top: Optional[float] = typer.Option(None, "--score-top", min=0.0, max=0.99, help="Image score: mean of the map's highest fraction of pixels (cpu default 0.01); 0: the map's maximum (paper)."),
    shifted_view: Optional[bool] = typer.Option(None, "--shifted-view/--no-shifted-view", help="Unaligned classes: also score a copy shifted by half a latent pixel and average the maps (twice the scoring cost for them)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no, fp16 (GPU), bf16, or auto (bf16 where the CPU or GPU computes it natively)."),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Add horizontally flipped views (only if flipped parts are still normal)."),
    vflip: Optional[bool] = typer.Option(None, "--vflip/--no-vflip", help="Add vertically flipped views."),
    class_conditional: Optional[bool] = typer.Option(None, "--class-conditional/--no-class-conditional", help="Let the denoiser see the class (default: on with several classes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.work/checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle at --out."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it."),
    anomalous: Optional[List[Path]] = typer.Option(None, "--anomalous", help="Labelled anomalous images (MVTec masks used when present): F1-optimal thresholds."),
) -> None:
    """Train a model on defect-free images and write a self-contained, calibrated bundle."""
    from decodiff_cli.fitting import fit as run_fit
    from decodiff_cli.inputs import find_training_images
    from decodiff_cli.training import TrainingInterrupted

    given = {name: value for name, value in ctx.params.items()
             if ctx.get_parameter_source(name) is not None and ctx.get_parameter_source(name).name == "COMMANDLINE"}
    file_values = read_config_file(config) if config is not None else {}
    options = {**file_values, **given}
    cfg = build_config(options.get("preset", preset), options)
    images, problems = find_training_images(data)
    for item, problem in problems:
        console.warn(problem)
    if not images:
        raise ValueError("no training images found in " + ", ".join(data))

    with console.progress_bar(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s")) as bar:
        try:
            # a config file's run options count as much as its model options (the command line wins)
            result = run_fit(images, out, cfg, overwrite=bool(options.get("overwrite", overwrite)),
                             resume=bool(options.get("resume", resume)), strict=bool(options.get("strict", strict)),
                             class_conditional=options.get("class_conditional", class_conditional),
                             anomalous=_anomalous_paths(anomalous), progress=RichFitProgress(bar))
        except TrainingInterrupted as stop:
            console.error(f"{stop}")
            raise typer.Exit(EXIT_INTERRUPTED)
    end_process_group_at_exit()
    if not result.is_main_process:  # the other ranks of `accelerate launch`: one summary is enough
        raise typer.Exit(EXIT_OK)
    console.info(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; bundle: {console.escape(str(result.bundle))}")
    _print_thresholds(result.bundle)
    raise typer.Exit(_left_out(len(result.skipped), problems))


class RichFitProgress(FitProgress):
    """`decodiff fit`'s progress: one line per stage, bars for encoding and training."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.tasks: dict[str, Any] = {}

    def images(self, train: int, holdout: int, categories: list[str], skipped: list[tuple[str, str]]) -> None:
        console.info(f"{train} training and {holdout} held-out image(s) in "
                     f"{len(categories)} class(es): {', '.join(categories)}")

    def skipped(self, path: str, reason: str) -> None:
        console.warn(f"skipped: {console.escape(reason)}")

    def encoding(self, done: int, total: int) -> None:
        if "encode" not in self.tasks:
            self.tasks["encode"] = self.bar.add_task("encoding", total=total, loss="-", speed="-")
        self.bar.update(self.tasks["encode"], completed=done)

    def cache(self, nbytes: int, on_disk: bool, images: int, views: int) -> None:
        where = "on disk" if on_disk else "in RAM"
        console.info(f"latent cache: {nbytes / 2**20:.1f} MiB {where} for {images} image(s), {views} view(s) each")

    def step(self, record: dict[str, Any]) -> None:
        if "train" not in self.tasks:
            self.tasks["train"] = self.bar.add_task("training", total=1000, loss="-", speed="-")
        # a time budget knows its steps once it has planned them: until then, by time
        total = record["max_steps"] or 1000
        completed = record["step"] if record["max_steps"] else record["progress"] * 1000
        self.bar.update(self.tasks["train"], total=total, completed=completed, loss=f"{record['loss']:.4f}",
                        speed=f"{record['images_per_s']:.1f}", description=f"training (epoch {record['epoch']:.1f})")

    def budget_warning(self, minutes: float, spent_s: float, after_s: float, training_s: float) -> None:
        console.warn(f"the steps before training (reading, encoding, normal latents) took {spent_s / 60:.1f} "
                     f"of the {minutes:g} budgeted minutes and those after it need about {after_s / 60:.1f}; "
                     f"training gets {training_s / 60:.1f}")

    def alignment(self, alignment: dict[str, float], aligned: list[str]) -> None:
        values = ", ".join(f"{name} {value:.2f}" for name, value in alignment.items())
        console.info(f"alignment of the training images (below {ALIGNED_BELOW} uses a per-position normal "
                     f"reference): {values}")

    def note(self, message: str) -> None:
        console.info(message)

    def reference(self, images: int) -> None:
        console.info(f"measuring the map's normal statistics on {images} training image(s)")

    def novelty(self, images: int) -> None:
        console.info(f"storing normal latents for the map's novelty term from {images} training image(s)")

    def calibrate(self, images: int) -> None:
        console.info(f"calibrating on {images} held-out image(s)")


def _left_out(skipped: int, problems: list) -> int:
    """Exit 3 when inputs were left out (each already named in a warning), as score does."""
    if skipped:
        console.warn(f"{skipped} unreadable file(s) left out (listed above)")
    return EXIT_INPUTS_FAILED if skipped or problems else EXIT_OK


def _anomalous_paths(items: Optional[List[Path]]) -> list[Path]:
    from decodiff_cli.inputs import expand_inputs

    if not items:
        return []
    images, problems = expand_inputs([str(p) for p in items])
    for item, problem in problems:
        console.warn(problem)
    return [image.path for image in images]


def _print_thresholds(bundle: Path) -> None:
    calibration = json.loads((bundle / "calibration.json").read_text())
    for name, entry in calibration.get("categories", {}).items():
        console.info(f"  {name}: image threshold {entry['image_threshold']:.4f}, pixel threshold "
                     f"{entry['pixel_threshold']:.4f} ({entry['rule']})")


@friendly_errors
def calibrate(
    bundle: Path = typer.Argument(..., help="The bundle whose thresholds to recompute.", show_default=False),
    data: List[str] = typer.Argument(..., help="Normal images (not used in training), as for fit.", show_default=False),
    anomalous: Optional[List[Path]] = typer.Option(None, "--anomalous", help="Labelled anomalous images: F1-optimal thresholds."),
    device: str = DEVICE_OPT,
) -> None:
    """Recompute a bundle's thresholds without retraining."""
    from decodiff_cli.fitting import recalibrate
    from decodiff_cli.inputs import find_training_images

    images, problems = find_training_images(data)
    for item, problem in problems:
        console.warn(problem)
    skipped: list[str] = []

    def skip(path: str, reason: str) -> None:
        skipped.append(path)
        console.warn(f"skipped: {console.escape(reason)}")

    calibration = recalibrate(bundle, images, _anomalous_paths(anomalous), device=device, skip=skip)
    rules = {c["rule"] for c in calibration["categories"].values()}
    console.info(f"thresholds set by: {', '.join(sorted(rules))}")
    _print_thresholds(bundle)
    raise typer.Exit(_left_out(len(skipped), problems))


@friendly_errors
def info(bundle: Path = typer.Argument(..., help="A bundle folder.", show_default=False)) -> None:
    """A readable summary of a bundle: what it was trained on and how it scores."""
    from rich.table import Table

    from decodiff_cli.bundle import read_bundle

    b = read_bundle(bundle)
    c = b.config
    table = Table(show_header=False, box=None)
    rows = [
        ("bundle", str(b.path)),
        ("format / decodiff", f"{c.format_version} / {c.decodiff_version}"),
        ("classes", ", ".join(c.categories) + (" (class-conditional)" if c.denoiser.num_classes else "")),
        ("autoencoder", f"{c.autoencoder.spec} ({c.autoencoder.kind}, {c.autoencoder.latent_channels} ch, /{c.autoencoder.downsample})"),
        ("denoiser", f"{c.denoiser.size}, latent {c.denoiser.latent_channels}x{c.denoiser.latent_shape[0]}x{c.denoiser.latent_shape[1]}"
                     + ("" if c.denoiser.prediction == "deviation" else f", predicts the {c.denoiser.prediction} latent")),
        ("preprocess", c.preprocess.describe()),
        ("noise schedule", f"T={c.schedule.num_timesteps}, {c.schedule.kind}"),
        ("training", describe_training(c.train)),
        ("replay", replay_options(c.train)),
        ("correction", f"t={c.correction.timesteps()} strategy {c.correction.strategy}"),
        ("map", _describe_map(c.anomaly_map, c.measured.alignment)),
        ("latent scaling", c.latent_scaling.kind + (f" x{c.latent_scaling.factor}" if c.latent_scaling.kind == "factor" else "")),
        ("files", ", ".join(f"{n} ({s / 2**20:.1f} MiB)" for n, s in b.files().items())),
    ]
    for name, entry in b.calibration.get("categories", {}).items():
        rows.append((f"thresholds [{name}]", f"image {entry['image_threshold']:.4f}, pixel {entry['pixel_threshold']:.4f} ({entry['rule']})"))
    for key, value in rows:
        table.add_row(console.escape(key), console.escape(value))
    console.out.print(table)


def describe_training(t) -> str:
    """The training recipe of docs/method.md 3-4, as a bundle records it."""
    probs = " ".join(f"{p:.2f}" for p in t.patch_probs)
    if t.lr_per_epoch:
        schedule = f"per epoch, warm-up {t.warmup_epochs} epochs"
    else:
        schedule = f"per step, warm-up {t.warmup_steps} steps"
    length = f"{t.steps_done} steps" if t.steps_done else (f"{t.epochs} epochs" if t.epochs else f"{t.max_steps} steps")
    return (f"{length}, batch {t.batch_size}, AdamW lr {t.lr:g} wd {t.weight_decay:g}, lr {schedule}, cosine to "
            f"{t.lr_floor:g}x at {t.cosine_horizon:g}x the length; "
            + (f"EMA {t.ema_decay:g}" if t.ema_decay > 0 else "no EMA") + f", precision {t.mixed_precision}; "
            f"patches {t.patch_sizes} p {probs}, mask ratio U(0, {t.mask_ratio_max:g}) "
            + ("exact count" if t.exact_mask else "per patch") + f", shuffled U(0, {t.shuffle_ratio_max:g}); latents: "
            + ("posterior samples" if t.posterior_samples else "encoder output") + f"; {t.augment_variants} view(s), seed {t.seed}")


def replay_options(t) -> str:
    """The fit options that train this model again (same data, settings and processes)."""
    if not t.steps_done:
        return "not recorded (a bundle of an earlier decodiff)"
    steps = t.max_steps or t.steps_done
    text = f"--max-steps {steps}" + (f" --stop-step {t.stop_step}" if t.stop_step else "")
    return text + f" --views {t.augment_variants} --seed {t.seed}"


def _describe_map(m, alignment: dict[str, float] | None = None) -> str:
    scale = "the decoder's [-1, 1] scale" if m.pixel_scale == "decoder" else "[0, 1] units"
    text = f"{m.combine}, pixel clip {m.pixel_clip} on {scale} (blur {m.pixel_sigma:g}), "
    if m.reference == "none":
        text += f"latent clip {m.latent_clip} (blur {m.latent_sigma:g})"
    else:
        text += f"latent z-score against a per-position normal reference, clip {m.reference_clip}"
    if m.features:
        text += f"; decoder-feature term, clip {m.feature_clip}"
    if m.novelty:
        text += (f"; novelty term at weight {m.novelty_weight:.2f} ({m.novelty_bank} normal vectors per class, "
                 f"clip {m.novelty_clip}" + ("" if m.novelty_windows == [3] else f", windows {m.novelty_windows}")
                 + (", and at each position" if m.novelty_positions else "") + ")")
    if m.shifted_view:
        text += "; shifted view for unaligned classes"
    text += f"; image score: mean of the top {m.score_top_fraction:.1%}" if m.score_top_fraction else "; image score: maximum"
    if alignment:
        text += "; alignment " + ", ".join(f"{name} {value:.2f}" for name, value in alignment.items())
    return text
