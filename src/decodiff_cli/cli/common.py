"""What the commands share: option declarations, error handling, input collection, detector
loading and the flow of the commands that write into an output folder.

torch, diffusers and accelerate are imported inside the functions, so `decodiff --help`
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

from decodiff_cli import console
from decodiff_cli.distributed import MainProcessFailed, PeerLost
from decodiff_cli.console import EXIT_ANOMALY, EXIT_INPUTS_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


class Dtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Format(str, Enum):
    table = "table"
    jsonl = "jsonl"
    csv = "csv"


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


def collect_inputs(items: List[str]):
    from decodiff_cli.inputs import expand_inputs

    images, problems = expand_inputs(items, stdin=sys.stdin if "-" in items else None)
    for item, problem in problems:
        console.warn(problem if item in problem else f"{item}: {problem}")
    if not images:
        raise ValueError("no images to process")
    return images, problems


def load_detector(bundle: Path, device: str, dtype: Dtype, batch_size: int):
    from decodiff_cli.detector import Detector

    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    return Detector.load(bundle, device=device, dtype=dtype.value, batch_size=batch_size)


def inference_options(detector, class_name: Optional[str], steps: Optional[int], threshold: Optional[float], pixel_threshold: Optional[float] = None):
    from decodiff_cli.runs import InferenceOptions

    if class_name is not None:
        detector.check_category(class_name)
    if steps is not None and steps < 1:
        raise ValueError("--steps must be at least 1")
    return InferenceOptions(category=class_name, steps=steps, threshold=threshold, pixel_threshold=pixel_threshold)


def exit_code(summary, input_problems, fail_on_anomaly: bool = False, report: bool = True) -> int:
    for path, problem in summary.failed if report else ():
        console.warn(problem)
    if summary.failed or input_problems:
        return EXIT_INPUTS_FAILED
    if fail_on_anomaly and summary.anomalous:
        return EXIT_ANOMALY
    return EXIT_OK


def process_group():
    """This process's share of an `accelerate launch` job (a group of one otherwise)."""
    from decodiff_cli.distributed import ProcessGroup

    group = ProcessGroup.from_environment()
    if not group.is_main:  # one progress bar, the main process's: N interleaved bars are noise
        os.environ["DECODIFF_NO_PROGRESS"] = "1"
    return group


def finish(group, summary, problems, fail_on_anomaly: bool = False):
    """The whole job's summary and exit code, the same on every process (so the worst code
    wins everywhere); failures are reported once, by the main process."""
    from decodiff_cli.runs import merge

    total = merge(group.gather(summary)) if group.size > 1 else summary
    return total, exit_code(total, problems, fail_on_anomaly, report=group.is_main)


def prepare_out_dir(out: Path, overwrite: bool, inputs) -> None:
    from decodiff_cli.runs import existing_outputs

    if existing_outputs(out) and not overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to write into it (files of the same name are replaced)")
    resolved = out.resolve()
    for image in inputs:
        if image.path.resolve() == resolved:
            raise ValueError(f"--out {out} is an input file")
    out.mkdir(parents=True, exist_ok=True)


def folder_job(label, bundle, inputs, out, overwrite, device, dtype, batch_size, make_options, job):
    """The shared flow of the commands that write into an output folder. Under `accelerate
    launch`, the main process checks the inputs and the folder, every process does its share
    (``job(detector, mine, opts, advance, all_inputs)``, all_inputs None for a single process),
    and the summary covers them all."""
    group = process_group()

    def plan():
        images, problems = collect_inputs(inputs)
        prepare_out_dir(out, overwrite, images)
        return images, problems

    images, problems = group.on_main(plan)
    detector = load_detector(bundle, group.device(device), dtype, batch_size)
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
DTYPE_OPT = typer.Option(Dtype.auto, "--dtype", help="Inference precision: auto (bf16 where the CPU or GPU computes it natively, else fp32), fp32, bf16 or fp16 (GPU).")
STEPS_OPT = typer.Option(None, "--steps", help="Number of correction steps (model calls); default from the bundle (5).")
