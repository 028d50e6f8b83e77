"""What the maintained benchmark scripts share."""

from __future__ import annotations

import os

import torch


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
