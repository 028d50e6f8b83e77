"""What `fit` reports while it runs: one method per event, typed, instead of string kinds.

``FitProgress`` does nothing; a caller overrides the methods it shows (the command line's
rich implementation is ``cli.fit.RichFitProgress``). `fit` reports from the main process
only, and never prints.
"""

from __future__ import annotations

from typing import Any


class FitProgress:
    """The events of a fit, in the order they come. Every method is a no-op here."""

    def note(self, message: str) -> None:
        """Something the user should know that changes nothing they asked for."""

    def skipped(self, path: str, reason: str) -> None:
        """An input left out (unreadable, too small, changed since it was listed)."""

    def images(self, train: int, holdout: int, categories: list[str], skipped: list[tuple[str, str]]) -> None:
        """The readable images, split into training and held-out sets."""

    def encoding(self, done: int, total: int) -> None:
        """Views encoded into the latent cache so far."""

    def cache(self, nbytes: int, on_disk: bool, images: int, views: int) -> None:
        """The latent cache is complete."""

    def alignment(self, alignment: dict[str, float], aligned: list[str]) -> None:
        """Per class, how aligned the training images are (the `auto` reference's choice)."""

    def novelty(self, images: int) -> None:
        """Storing the normal latents of the novelty term begins."""

    def budget_warning(self, minutes: float, spent_s: float, after_s: float, training_s: float) -> None:
        """The steps around training take more than half of a time budget."""

    def step(self, record: dict[str, Any]) -> None:
        """One optimiser step made: the training log's record of it (step, loss, lr,
        images_per_s, progress, max_steps, ...)."""

    def reference(self, images: int) -> None:
        """Measuring the map's normal statistics begins."""

    def calibrate(self, images: int) -> None:
        """Calibrating the thresholds begins."""


NO_PROGRESS = FitProgress()
