"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from decodiff_cli.benchmark import _stored_map
from decodiff_cli.detector import Detector
from decodiff_cli.evaluation import BundlePredictor


def choose_threads(option: str) -> str:
    """Set torch's thread count; 'auto' = 1 on a busy CPU, else torch's default. Returns why."""
    if option != "auto":
        torch.set_num_threads(max(1, int(option)))
        return "as asked"
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "torch's default"
    cores = os.cpu_count() or 1
    if load > 0.75 * cores and torch.get_num_threads() > 1:
        # On an oversubscribed CPU, OpenMP threads wait on each other at every op: we saw
        # single training steps take 8x longer with 2 threads than with 1, at random.
        torch.set_num_threads(1)
        return f"auto: 1, as the CPU is busy (load average {load:.1f} on {cores} cores); --threads N to override"
    return "auto: torch's default"


def protocol_maps(source: str | Path, category, protocol: str, samples) -> Iterator[np.ndarray]:
    """The anomaly maps `decodiff benchmark` would score for ``samples`` of ``category``,
    in the protocol's geometry: a bundle's (a folder with config.json, run on one CPU
    thread) or stored ones in the `--maps` layout."""
    source = Path(source)
    if (source / "config.json").is_file():
        torch.set_num_threads(1)
        predict = BundlePredictor(Detector.load(source, device="cpu"), protocol)
        for amap, _ in predict([s.image for s in samples], category.name):
            yield np.asarray(amap, dtype=np.float32)
    else:
        for s in samples:
            yield _stored_map(source, category.name, s, protocol)
