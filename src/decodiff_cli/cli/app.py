"""The `decodiff` command: the Typer app and, explicitly, its seven commands.

Each command lives in the module of its group (`fit`, `score`, `benchmark`) and parses its
options, calls one library function and prints; what they share is in `common`.
"""

from __future__ import annotations

import typer

from decodiff_cli import __version__, console, distributed
from decodiff_cli.cli import benchmark, fit, score
from decodiff_cli.console import EXIT_CODES_HELP

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


def _version(value: bool) -> None:
    if value:
        console.out.print(f"decodiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


# In the order `decodiff --help` lists them.
app.command("score", epilog=score.SCORE_EPILOG)(score.score)
app.command("localize", epilog=score.LOCALIZE_EPILOG)(score.localize)
app.command("export-masks", epilog=score.EXPORT_MASKS_EPILOG)(score.export_masks)
app.command("fit", epilog=fit.FIT_EPILOG)(fit.fit)
app.command("calibrate", epilog=fit.CALIBRATE_EPILOG)(fit.calibrate)
app.command("info", epilog=fit.INFO_EPILOG)(fit.info)
app.command("benchmark", epilog=benchmark.BENCHMARK_EPILOG)(benchmark.benchmark)


def main() -> None:
    try:
        app()
    except SystemExit as done:  # the app always ends this way: click's standalone mode
        distributed.leave_launch(done.code)  # returns unless a launched command succeeded
        raise
