"""Images/s of `decodiff score` in one process and under `accelerate launch` with N processes.

    python benchmarks/score_processes.py BUNDLE IMAGES [--processes 2]

Both runs score IMAGES into a fresh --output file, one torch thread per process, no GPU
(N CPU processes over gloo, as in the tests). The time is the command's wall clock,
start-up and model loading included: what a cron job sees. Prints both rates, the
speed-up, and checks that the N-process file holds every record once with the same scores
(within 1e-4). The CPU is shared: rerun and quote the conditions with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _records(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_path = {r["path"]: r for r in rows}
    if len(by_path) != len(rows):
        raise SystemExit(f"{path}: a path appears twice")
    return by_path


def _run(command: list[str], env: dict) -> float:
    began = time.monotonic()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - began
    if done.returncode not in (0, 1, 3):  # 1 and 3 only report what was found
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("images")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DECODIFF_NO_PROGRESS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
        one, many = Path(tmp, "one.jsonl"), Path(tmp, "many.jsonl")
        t1 = _run([sys.executable, "-m", "decodiff_cli", "score", args.bundle, args.images, "--output", str(one)], env)
        sock.close()
        tn = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", port, "-m", "decodiff_cli", "score", args.bundle, args.images,
                   "--output", str(many)], env)
        a, b = _records(one), _records(many)
    if set(a) != set(b):
        raise SystemExit("the two runs scored different inputs")
    diff = max((abs(a[p]["score"] - b[p]["score"]) for p in a if a[p]["score"] is not None), default=0.0)
    n = len(a)
    print(f"{n} images; 1 process: {t1:.1f} s, {n / t1:.2f} images/s; {args.processes} processes: "
          f"{tn:.1f} s, {n / tn:.2f} images/s; speed-up {t1 / tn:.2f}x; max |score difference| {diff:.2e}")


if __name__ == "__main__":
    main()
