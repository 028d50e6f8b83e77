"""The `decodiff` command line: `app` (the Typer app) and `main` (the `decodiff` entry point).

Modules: `app` builds the Typer app and registers the commands; `common` holds what they
share; `fit`, `score` and `benchmark` hold one group of commands each.
"""

from decodiff_cli.cli.app import app, main

__all__ = ["app", "main"]
