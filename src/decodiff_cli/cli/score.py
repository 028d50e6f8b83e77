"""`decodiff score`, `decodiff localize`, `decodiff export-masks`: using a bundle on images."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from decodiff_cli import console
from decodiff_cli.cli.common import (
    BATCH_OPT,
    BUNDLE_ARG,
    CLASS_OPT,
    DEVICE_OPT,
    DTYPE_OPT,
    INPUTS_ARG,
    STEPS_OPT,
    Dtype,
    Format,
    collect_inputs,
    finish,
    folder_job,
    friendly_errors,
    inference_options,
    load_detector,
    process_group,
)
from decodiff_cli.console import EXIT_CODES_HELP

SCORE_EPILOG = ("Examples:\n\n  decodiff score model ./images\n\n  find /data/new -name '*.png' | decodiff score model - --format jsonl\n\n"
                "  decodiff score model ./tonight --output scores.jsonl --skip-existing --fail-on-anomaly\n\n" + EXIT_CODES_HELP)
LOCALIZE_EPILOG = "Example:\n\n  decodiff localize model ./images --out review/  # then open review/index.html\n\n" + EXIT_CODES_HELP
EXPORT_MASKS_EPILOG = "Example:\n\n  decodiff export-masks model ./images --out masks/ --min-area 50\n\n" + EXIT_CODES_HELP

# ----------------------------------------------------------------------------- score


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
    from decodiff_cli.records import RecordWriter, read_scored_paths

    group = process_group()

    def plan():
        if skip_existing and output is None:
            raise ValueError("--skip-existing needs --output FILE")
        if output is not None and fmt == Format.table:
            raise ValueError("--format table is for the terminal; use jsonl or csv with --output")
        images, problems = collect_inputs(inputs)
        # Decided once, before the split: every process skips the same inputs.
        if skip_existing and output.exists():
            before = len(images)
            images = runs.skip_already_scored(images, read_scored_paths(output))
            console.info(f"skipping {before - len(images)} already scored image(s)")
        return images, problems

    fmt = fmt or (Format.table if output is None and console.stdout_is_terminal() else Format.jsonl)
    images, problems = group.on_main(plan)
    detector = load_detector(bundle, group.device(device), dtype, batch_size)
    opts = inference_options(detector, class_name, steps, threshold)
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
    summary, code = finish(group, summary, problems, fail_on_anomaly)
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
    """Anomaly heatmaps, overlays, the inputs beside their corrected images and raw float TIFF maps, with an index.html gallery."""
    from decodiff_cli import runs
    from decodiff_cli.gallery import write_gallery

    group, summary, problems = folder_job(
        "localizing", bundle, inputs, out, overwrite, device, dtype, batch_size,
        lambda detector: inference_options(detector, class_name, steps, threshold),
        lambda detector, images, opts, advance, everything: runs.localize(
            detector, images, opts, out, advance, all_inputs=everything, write_index=everything is None))
    summary, code = finish(group, summary, problems)
    if group.size > 1 and group.is_main:  # after the gather: every process has finished its share
        write_gallery(out, summary.gallery)
    if group.is_main:
        console.info(f"{summary.processed} image(s), {summary.anomalous} anomalous; gallery: {console.escape(str(out / 'index.html'))}")
    group.finish()
    raise typer.Exit(code)


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

    group, summary, problems = folder_job(
        "masks", bundle, inputs, out, overwrite, device, dtype, batch_size,
        lambda detector: inference_options(detector, class_name, steps, None, pixel_threshold=threshold),
        lambda detector, images, opts, advance, everything: runs.export_masks(
            detector, images, opts, out, min_area, advance, all_inputs=everything))
    summary, code = finish(group, summary, problems)
    if group.is_main:
        console.info(f"{summary.processed} mask(s) in {console.escape(str(out))}")
    group.finish()
    raise typer.Exit(code)
