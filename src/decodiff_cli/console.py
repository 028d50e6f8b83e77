"""The one place that talks to the terminal.

Results go to stdout (so pipelines get only data); progress, messages and errors go to
stderr. Progress bars appear only when stderr is a terminal.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Exit codes, documented in `decodiff --help` and the README.
EXIT_OK = 0
EXIT_ANOMALY = 1  # --fail-on-anomaly and at least one image was anomalous
EXIT_USAGE = 2  # bad arguments, bad bundle or data: nothing useful was done
EXIT_INPUTS_FAILED = 3  # some inputs could not be processed; the rest were
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM (fit leaves a resumable checkpoint)

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 anomalies found (with --fail-on-anomaly); 2 usage error "
    "(bad options, bundle or data); 3 some inputs failed (the rest were processed; wins over 1); "
    "130 interrupted."
)

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def show_progress() -> bool:
    return err.is_terminal and not os.environ.get("DECODIFF_NO_PROGRESS")


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}")


def info(message: str) -> None:
    err.print(message)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


@contextmanager
def progress_bar(*extra: TextColumn) -> Iterator[Progress]:
    """A rich progress bar on stderr; disabled (but still usable) off a terminal."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=err, disable=not show_progress(), transient=False) as bar:
        yield bar


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
