"""Score a list of image paths with ``Detector`` inside a distributed job (accelerate).

Every process loads the bundle on its own device, scores its contiguous share of the
paths, and the main process writes all the records, in input order:

    accelerate launch --multi_gpu --num_processes 4 examples/distributed_score.py model/ paths.txt scores.jsonl
    python examples/distributed_score.py model/ paths.txt scores.jsonl      # one process works too

paths.txt holds one image path per line. (`decodiff score` does the same under `accelerate
launch`, with --output, --skip-existing and the rest; this is the pattern for your own code.)
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from decodiff_cli import Detector


def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN: a failed image scores null


def score_paths(bundle: str, paths: list[str]) -> list[dict] | None:
    """All the records on the main process (None on the others)."""
    # cpu=True when there is no GPU: a `--multi_gpu` launch then forms a CPU (gloo) group.
    state = PartialState(cpu=not torch.cuda.is_available())
    detector = Detector.load(bundle, device=str(state.device))
    with state.split_between_processes(paths) as mine:  # contiguous shares, in rank order
        rows = [{"path": p.path, "class": p.category, "score": _number(p.score),
                 "is_anomalous": None if p.error else p.is_anomalous, "error": p.error} for p in detector.predict(mine)]
    rows = gather_object(rows)  # every process's rows, concatenated in rank order = input order
    return rows if state.is_main_process else None


def main(bundle: str, paths_file: str, out: str) -> None:
    with open(paths_file) as f:
        paths = [line.strip() for line in f if line.strip()]
    try:
        rows = score_paths(bundle, paths)
        if rows is not None:
            with open(out, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    finally:  # left to the interpreter's exit, gloo can abort the process (SIGABRT) after the work is done
        distributed = torch.distributed.is_initialized()
        if distributed:
            torch.distributed.destroy_process_group()
    if distributed:
        # Even destroyed, a gloo thread can still abort the interpreter's finalisation
        # (pytorch/pytorch#190489). The work succeeded and its file is closed: skip that.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
