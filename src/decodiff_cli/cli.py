"""The `decodiff` command: parse options, call the library, print. Nothing else lives here.

torch, diffusers and accelerate are imported inside the commands, so `decodiff --help`
stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from decodiff_cli import __version__, console
from decodiff_cli.distributed import MainProcessFailed, PeerLost
from decodiff_cli.console import (
    EXIT_ANOMALY,
    EXIT_CODES_HELP,
    EXIT_INPUTS_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
)

app = typer.Typer(
    name="decodiff",
    help="Find and localise visual defects after seeing only defect-free images (DeCo-Diff).\n\n"
    "Typical use:\n\n"
    "  decodiff fit ./normal --out model --autoencoder pixel\n\n"
    "  decodiff score model ./incoming --fail-on-anomaly\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Format(str, Enum):
    table = "table"
    jsonl = "jsonl"
    csv = "csv"


def _version(value: bool) -> None:
    if value:
        console.out.print(f"decodiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """A user error becomes one stderr line and exit code 2, never a traceback
    (set DECODIFF_DEBUG=1 to see one)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            console.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED)
        except MainProcessFailed:  # the main process has printed the error already
            raise typer.Exit(EXIT_USAGE)
        except PeerLost as err:
            console.error(console.escape(str(err)))
            raise typer.Exit(EXIT_USAGE)
        except BrokenPipeError:  # `decodiff score ... | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_OK)
        except (ValueError, OSError) as err:
            if os.environ.get("DECODIFF_DEBUG"):
                raise
            console.error(console.escape(str(err)))
            raise typer.Exit(EXIT_USAGE)

    return wrapper


# --------------------------------------------------------------------------- inputs


def _collect_inputs(items: List[str]):
    from decodiff_cli.inputs import expand_inputs

    images, problems = expand_inputs(items, stdin=sys.stdin if "-" in items else None)
    for item, problem in problems:
        console.warn(problem if item in problem else f"{item}: {problem}")
    if not images:
        raise ValueError("no images to process")
    return images, problems


def _load_detector(bundle: Path, device: str, dtype: Dtype, batch_size: int):
    from decodiff_cli.detector import Detector

    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    return Detector.load(bundle, device=device, dtype=dtype.value, batch_size=batch_size)


def _options(detector, class_name: Optional[str], steps: Optional[int], threshold: Optional[float], pixel_threshold: Optional[float] = None):
    from decodiff_cli.runs import InferenceOptions

    if class_name is not None:
        detector.check_category(class_name)
    if steps is not None and steps < 1:
        raise ValueError("--steps must be at least 1")
    return InferenceOptions(category=class_name, steps=steps, threshold=threshold, pixel_threshold=pixel_threshold)


def _exit_code(summary, input_problems, fail_on_anomaly: bool = False, report: bool = True) -> int:
    for path, problem in summary.failed if report else ():
        console.warn(problem)
    if summary.failed or input_problems:
        return EXIT_INPUTS_FAILED
    if fail_on_anomaly and summary.anomalous:
        return EXIT_ANOMALY
    return EXIT_OK


def _process_group():
    """This process's share of an `accelerate launch` job (a group of one otherwise)."""
    from decodiff_cli.distributed import ProcessGroup

    group = ProcessGroup.from_environment()
    if not group.is_main:  # one progress bar, the main process's: N interleaved bars are noise
        os.environ["DECODIFF_NO_PROGRESS"] = "1"
    return group


def _finish(group, summary, problems, fail_on_anomaly: bool = False):
    """The whole job's summary and exit code, the same on every process (so the worst code
    wins everywhere); failures are reported once, by the main process."""
    from decodiff_cli.runs import merge

    total = merge(group.gather(summary)) if group.size > 1 else summary
    return total, _exit_code(total, problems, fail_on_anomaly, report=group.is_main)


def _prepare_out_dir(out: Path, overwrite: bool, inputs) -> None:
    from decodiff_cli.runs import existing_outputs

    if existing_outputs(out) and not overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to write into it (files of the same name are replaced)")
    resolved = out.resolve()
    for image in inputs:
        if image.path.resolve() == resolved:
            raise ValueError(f"--out {out} is an input file")
    out.mkdir(parents=True, exist_ok=True)


def _folder_job(label, bundle, inputs, out, overwrite, device, dtype, batch_size, make_options, job):
    """The shared flow of the commands that write into an output folder. Under `accelerate
    launch`, the main process checks the inputs and the folder, every process does its share
    (``job(detector, mine, opts, advance, all_inputs)``, all_inputs None for a single process),
    and the summary covers them all."""
    group = _process_group()

    def plan():
        images, problems = _collect_inputs(inputs)
        _prepare_out_dir(out, overwrite, images)
        return images, problems

    images, problems = group.on_main(plan)
    detector = _load_detector(bundle, group.device(device), dtype, batch_size)
    opts = make_options(detector)
    mine = group.split(images)
    with console.progress_bar() as bar:
        task = bar.add_task(label, total=len(mine))
        summary = job(detector, mine, opts, lambda: bar.advance(task), images if group.size > 1 else None)
    return group, summary, problems


BUNDLE_ARG = typer.Argument(..., help="A model bundle made by `decodiff fit`.", show_default=False)
INPUTS_ARG = typer.Argument(..., help="Image files, folders (recursive), globs, or - to read paths from stdin.", show_default=False)
CLASS_OPT = typer.Option(None, "--class", help="Category to score as (unified models); inferred from the path or the image when omitted.")
BATCH_OPT = typer.Option(8, "--batch-size", help="Images per forward pass.")
DEVICE_OPT = typer.Option("auto", "--device", help="auto (a GPU if there is one; under `accelerate launch`, each process its own), cpu, cuda or cuda:N.")
DTYPE_OPT = typer.Option(Dtype.fp32, "--dtype", help="Inference precision: fp32, bf16 (CPU/GPU) or fp16 (GPU).")
STEPS_OPT = typer.Option(None, "--steps", help="Number of correction steps (model calls); default from the bundle (5).")


# ----------------------------------------------------------------------------- score


@app.command(epilog="Examples:\n\n  decodiff score model ./images\n\n  find /data/new -name '*.png' | decodiff score model - --format jsonl\n\n"
             "  decodiff score model ./tonight --output scores.jsonl --skip-existing --fail-on-anomaly\n\n" + EXIT_CODES_HELP)
@friendly_errors
def score(
    bundle: Path = BUNDLE_ARG,
    inputs: List[str] = INPUTS_ARG,
    class_name: Optional[str] = CLASS_OPT,
    fmt: Optional[Format] = typer.Option(None, "--format", help="table (default on a terminal), jsonl (default when piped) or csv."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Append records to this file instead of stdout."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Override the calibrated image threshold."),
    fail_on_anomaly: bool = typer.Option(False, "--fail-on-anomaly", help="Exit 1 when any image is anomalous."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="With --output: skip images already scored in that file."),
    batch_size: int = BATCH_OPT,
    device: str = DEVICE_OPT,
    dtype: Dtype = DTYPE_OPT,
    steps: Optional[int] = STEPS_OPT,
) -> None:
    """Score images: one record per image (path, class, score, threshold, normalized_score, is_anomalous)."""
    from decodiff_cli import runs
    from decodiff_cli.outputs import RecordWriter, read_scored_paths

    group = _process_group()

    def plan():
        if skip_existing and output is None:
            raise ValueError("--skip-existing needs --output FILE")
        if output is not None and fmt == Format.table:
            raise ValueError("--format table is for the terminal; use jsonl or csv with --output")
        images, problems = _collect_inputs(inputs)
        # Decided once, before the split: every process skips the same inputs.
        if skip_existing and output.exists():
            before = len(images)
            images = runs.skip_already_scored(images, read_scored_paths(output))
            console.info(f"skipping {before - len(images)} already scored image(s)")
        return images, problems

    fmt = fmt or (Format.table if output is None and console.stdout_is_terminal() else Format.jsonl)
    images, problems = group.on_main(plan)
    detector = _load_detector(bundle, group.device(device), dtype, batch_size)
    opts = _options(detector, class_name, steps, threshold)
    mine = group.split(images)
    # Each process appends to --output itself (one flock'ed write per record); stdout is the
    # main process's alone, so with several processes the records are gathered first.
    to_stdout_later = fmt == Format.table or (output is None and group.size > 1)
    rows: list = []
    with console.progress_bar() as bar:
        task = bar.add_task("scoring", total=len(mine))
        if to_stdout_later:
            summary = runs.score(detector, mine, opts, rows.append, lambda: bar.advance(task))
        else:
            with RecordWriter(output if output is not None else sys.stdout, fmt.value) as writer:
                summary = runs.score(detector, mine, opts, writer.write, lambda: bar.advance(task))
    if to_stdout_later:
        rows = [row for part in group.gather(rows) for row in part]  # process order = input order
    summary, code = _finish(group, summary, problems, fail_on_anomaly)
    if group.is_main and fmt == Format.table:
        _print_score_table(rows)
    elif group.is_main and to_stdout_later:
        with RecordWriter(sys.stdout, fmt.value) as writer:
            for row in rows:
                writer.write(row)
    group.finish()
    raise typer.Exit(code)


def _print_score_table(rows) -> None:
    from rich.table import Table

    from rich.table import Column

    table = Table(Column("path", overflow="fold"), "class", "score", "threshold", "normalized", "decision")
    for r in rows:
        if r.error:
            table.add_row(console.escape(str(r.path)), "", "", "", "", "[red]failed[/]")
            continue
        decision = "[bold red]anomalous[/]" if r.is_anomalous else "[green]normal[/]"
        table.add_row(console.escape(str(r.path)), r.cls or "", f"{r.score:.4f}", f"{r.threshold:.4f}", f"{r.normalized_score:.3f}", decision)
    console.out.print(table)


# -------------------------------------------------------------------------- localize


@app.command(epilog="Example:\n\n  decodiff localize model ./images --out review/  # then open review/index.html\n\n" + EXIT_CODES_HELP)
@friendly_errors
def localize(
    bundle: Path = BUNDLE_ARG,
    inputs: List[str] = INPUTS_ARG,
    out: Path = typer.Option(..., "--out", help="Output folder (mirrors the inputs' relative paths)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out folder."),
    class_name: Optional[str] = CLASS_OPT,
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Override the calibrated image threshold."),
    batch_size: int = BATCH_OPT,
    device: str = DEVICE_OPT,
    dtype: Dtype = DTYPE_OPT,
    steps: Optional[int] = STEPS_OPT,
) -> None:
    """Anomaly heatmaps, overlays, corrected images and raw float TIFF maps, with an index.html gallery."""
    from decodiff_cli import runs
    from decodiff_cli.outputs import write_gallery

    group, summary, problems = _folder_job(
        "localizing", bundle, inputs, out, overwrite, device, dtype, batch_size,
        lambda detector: _options(detector, class_name, steps, threshold),
        lambda detector, images, opts, advance, everything: runs.localize(
            detector, images, opts, out, advance, all_inputs=everything, write_index=everything is None))
    summary, code = _finish(group, summary, problems)
    if group.size > 1 and group.is_main:  # after the gather: every process has finished its share
        write_gallery(out, summary.gallery)
    if group.is_main:
        console.info(f"{summary.processed} image(s), {summary.anomalous} anomalous; gallery: {console.escape(str(out / 'index.html'))}")
    group.finish()
    raise typer.Exit(code)


@app.command("export-masks", epilog="Example:\n\n  decodiff export-masks model ./images --out masks/ --min-area 50\n\n" + EXIT_CODES_HELP)
@friendly_errors
def export_masks(
    bundle: Path = BUNDLE_ARG,
    inputs: List[str] = INPUTS_ARG,
    out: Path = typer.Option(..., "--out", help="Output folder for <name>_mask.png files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out folder."),
    class_name: Optional[str] = CLASS_OPT,
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Override the calibrated *pixel* threshold."),
    min_area: int = typer.Option(0, "--min-area", help="Drop connected regions smaller than this many pixels."),
    batch_size: int = BATCH_OPT,
    device: str = DEVICE_OPT,
    dtype: Dtype = DTYPE_OPT,
    steps: Optional[int] = STEPS_OPT,
) -> None:
    """Binary masks (PNG, 0/255) at each image's resolution, from the calibrated pixel threshold."""
    from decodiff_cli import runs

    group, summary, problems = _folder_job(
        "masks", bundle, inputs, out, overwrite, device, dtype, batch_size,
        lambda detector: _options(detector, class_name, steps, None, pixel_threshold=threshold),
        lambda detector, images, opts, advance, everything: runs.export_masks(
            detector, images, opts, out, min_area, advance, all_inputs=everything))
    summary, code = _finish(group, summary, problems)
    if group.is_main:
        console.info(f"{summary.processed} mask(s) in {console.escape(str(out))}")
    group.finish()
    raise typer.Exit(code)


def main() -> None:
    from decodiff_cli import cli_fit, cli_benchmark  # noqa: F401  (registers the commands)

    app()
