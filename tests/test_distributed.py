"""`accelerate launch` splits score, localize and export-masks between processes.

Two CPU processes over gloo, started the way tests/test_training.py starts `fit`
(`--multi_gpu` without a GPU: see fitting.cpu_only_launch), each run compared with the
same command in one process. A launch costs 10-15 s here, so one launch (through a shim
that runs several commands in the same two processes) covers score --output,
--skip-existing, localize and export-masks; one runs the real `-m decodiff_cli score`
to stdout; one makes a process hang.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

launches = [pytest.mark.slow,
            pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")]

# Runs each command of COMMANDS (a JSON list of argument lists) in this process of the
# launch, in order, and records its exit code and stdout per rank. FAULT=hang makes
# rank 1 stop answering in the middle of localize, FAULT=die makes it exit there.
SHIM = """
import contextlib, json, os, sys, time
from pathlib import Path
sys.argv[0] = "decodiff"
from decodiff_cli import cli, runs
if os.environ.get("FAULT") and os.environ["RANK"] == "1":
    def localize(*args, **kwargs):
        if os.environ["FAULT"] == "die":
            os._exit(9)
        time.sleep(600)
    runs.localize = localize
results = Path(os.environ["RESULTS"])
worst = 0
for i, args in enumerate(json.loads(os.environ["COMMANDS"])):
    with open(results / ("rank%s_%d.out" % (os.environ["RANK"], i)), "w") as out, contextlib.redirect_stdout(out):
        code = cli.app(args, standalone_mode=False, prog_name="decodiff") or 0
    (results / ("rank%s_%d.code" % (os.environ["RANK"], i))).write_text(str(code))
    worst = worst or code
sys.exit(worst)  # as the command itself would: the launcher stops the other process on a failure
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _launch(tmp_path: Path, script: list[str], timeout: float = 120, **env_extra) -> tuple[subprocess.CompletedProcess, float]:
    """`accelerate launch --multi_gpu --num_processes 2 SCRIPT...` on the CPU; (result, seconds)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "DECODIFF_")) and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HOME=str(tmp_path / "hf"),  # no GPU, no accelerate config file
               OMP_NUM_THREADS="1", DECODIFF_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]), **env_extra)
    for attempt in (1, 2):
        result, seconds = _launch_once(script, env, timeout)
        # The free port can be taken by another job between our probe and the launch: retry once.
        if attempt == 2 or "address already in use" not in result.stderr.lower():
            return result, seconds
    raise AssertionError("unreachable")


def _launch_once(script: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *script]
    start = time.monotonic()
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group: a hang takes no workers along
    try:
        stdout, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _descendants(launcher.pid):  # torch elastic starts each worker in its own session
            os.kill(pid, signal.SIGKILL)
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail(f"accelerate launch did not finish in {timeout} s")
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr), time.monotonic() - start


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _by_path(records: list[dict]) -> dict[str, dict]:
    assert len({r["path"] for r in records}) == len(records), "a path was written twice"
    return {r["path"]: r for r in records}


def _assert_same_records(got: list[dict], want: list[dict]) -> None:
    got_map, want_map = _by_path(got), _by_path(want)
    assert set(got_map) == set(want_map)
    for path, w in want_map.items():
        g = got_map[path]
        differ = f"{path}: got {g}, want {w}"  # whole records, so that a rare failure can be read
        assert (g["error"] is None) == (w["error"] is None), differ
        assert g["class"] == w["class"] and g["is_anomalous"] == w["is_anomalous"], differ
        if w["score"] is not None:
            assert abs(g["score"] - w["score"]) <= 1e-4, differ


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, test_images) -> Path:
    """The 6 test images (2 good, 4 defective) in one folder, with an unreadable file
    sorted last, so it falls in the second process's share."""
    folder = tmp_path_factory.mktemp("dist_inputs")
    for p in test_images:
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    (folder / "zz_broken.png").write_bytes(b"not a png")
    return folder


@launches[0]
@launches[1]
def test_score_to_stdout_is_gathered_by_the_main_process_in_input_order(invoke, bundle, inputs, tmp_path):
    single = invoke("score", bundle, inputs, "--format", "jsonl", "--fail-on-anomaly")
    assert single.exit_code == 3  # the broken file wins over the anomalies
    want = _jsonl(single.stdout)

    result, seconds = _launch(tmp_path, ["-m", "decodiff_cli", "score", str(bundle), str(inputs),
                                         "--format", "jsonl", "--fail-on-anomaly"])
    print(f"two processes: {seconds:.1f} s")
    got = _jsonl(result.stdout)
    assert [r["path"] for r in got] == [r["path"] for r in want]  # once each, in input order
    _assert_same_records(got, want)
    # The broken file is scored by rank 1, the anomalies are in rank 0's share; both
    # processes exit 3, which the launcher (torch elastic) reports, then exits 1. (It may
    # stop the second one to exit with SIGTERM once the first has: -15.)
    assert result.returncode != 0
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)
    assert "3" in codes and set(codes) <= {"3", "-15"}, result.stderr[-3000:]
    assert result.stderr.count("zz_broken.png") >= 1


@launches[0]
@launches[1]
def test_output_skip_existing_localize_and_masks_match_one_process(invoke, bundle, inputs, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    assert invoke("score", bundle, inputs, "--output", single / "all.jsonl").exit_code == 3
    want = _jsonl((single / "all.jsonl").read_text())
    assert invoke("localize", bundle, inputs, "--out", single / "review").exit_code == 3
    assert invoke("export-masks", bundle, inputs, "--out", single / "masks").exit_code == 3
    single_csv = invoke("score", bundle, inputs, "--format", "csv").stdout

    dist = tmp_path / "dist"
    dist.mkdir()
    # --skip-existing: two images already in the file are skipped by both processes.
    (dist / "resumed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in want[:2]))
    commands = [
        ["score", str(bundle), str(inputs), "--output", str(dist / "all.jsonl")],
        ["score", str(bundle), str(inputs), "--output", str(dist / "resumed.jsonl"), "--skip-existing"],
        ["localize", str(bundle), str(inputs), "--out", str(dist / "review")],
        ["export-masks", str(bundle), str(inputs), "--out", str(dist / "masks")],
        ["score", str(bundle), str(inputs), "--format", "csv"],
    ]
    shim = tmp_path / "shim.py"
    shim.write_text(SHIM)
    results = tmp_path / "results"
    results.mkdir()
    result, seconds = _launch(tmp_path, [str(shim)], COMMANDS=json.dumps(commands), RESULTS=str(results))
    print(f"two processes, four commands: {seconds:.1f} s")
    # Every command, in every process, exits with the worst code of the job.
    codes = {f.name: f.read_text() for f in results.glob("*.code")}
    assert codes == {f"rank{r}_{i}.code": "3" for r in (0, 1) for i in range(len(commands))}, result.stderr[-3000:]
    # Nothing on stdout with --output / --out; without, the main process's alone: one header.
    assert [f.name for f in sorted(results.glob("*.out")) if f.read_text()] == ["rank0_4.out"]
    got_csv = (results / "rank0_4.out").read_text().splitlines()
    assert [line.split(",")[0] for line in got_csv] == [line.split(",")[0] for line in single_csv.splitlines()]

    _assert_same_records(_jsonl((dist / "all.jsonl").read_text()), want)
    resumed = _jsonl((dist / "resumed.jsonl").read_text())
    _assert_same_records(resumed, want)  # the 2 old records plus the 4 others, once each
    assert resumed[:2] == want[:2]

    # The same files; images and masks byte for byte, the float maps within 1e-4.
    import numpy as np
    from decodiff_cli.render import read_float_tiff

    for name in ("review", "masks"):
        got, expected = _files(dist / name), _files(single / name)
        assert set(got) == set(expected)
        for key in expected:
            if key.endswith(".tiff"):
                assert np.abs(read_float_tiff(dist / name / key) - read_float_tiff(single / name / key)).max() <= 1e-4
            elif key != "index.html" and not key.endswith("_recon.png") and not key.endswith("_overlay.png"):
                assert got[key] == expected[key], key
    # One gallery, written after both processes finished: every image once, the broken one failed.
    page = (dist / "review" / "index.html").read_text()
    expected_page = (single / "review" / "index.html").read_text()
    assert "7 images, " in page and "1 failed" in page
    assert page.count("<tr>") == expected_page.count("<tr>") == 7  # a header row, 6 images
    assert page.count("<li>") == 1


@launches[0]
@launches[1]
@pytest.mark.parametrize("fault", ["hang", "die"])
def test_a_process_that_hangs_or_dies_fails_the_job_in_bounded_time_without_a_gallery(fault, bundle, inputs, tmp_path):
    shim = tmp_path / "shim.py"
    shim.write_text(SHIM)
    results = tmp_path / "results"
    results.mkdir()
    out = tmp_path / "review"
    result, seconds = _launch(tmp_path, [str(shim)], timeout=120, FAULT=fault, DECODIFF_DIST_TIMEOUT="3",
                              COMMANDS=json.dumps([["localize", str(bundle), str(inputs), "--out", str(out)]]),
                              RESULTS=str(results))
    assert result.returncode != 0
    assert seconds < 90, f"took {seconds:.0f} s"
    if fault == "hang":  # the main process gives up waiting, with a sentence that says why
        assert "did not answer within 3 s" in result.stderr, result.stderr[-3000:]
        assert (results / "rank0_0.code").read_text() == "2"
    else:  # the launcher stops the survivor (or it loses the connection, whichever comes first)
        assert "exitcode  : 9" in result.stderr, result.stderr[-3000:]
    assert not (out / "index.html").exists()  # no gallery for a job that did not finish
    assert not list(out.rglob(".decodiff-*"))  # no half-written file


def _example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"decodiff_example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@launches[0]
@launches[1]
def test_python_pattern_example_shards_paths_like_one_process(invoke, bundle, inputs, tmp_path):
    paths = sorted(str(p) for p in inputs.iterdir())
    (tmp_path / "paths.txt").write_text("".join(p + "\n" for p in paths))
    want = _jsonl(invoke("score", bundle, *paths, "--format", "jsonl").stdout)
    script = [str(REPO / "examples" / "distributed_score.py"), str(bundle), str(tmp_path / "paths.txt"),
              str(tmp_path / "scores.jsonl")]
    result, _ = _launch(tmp_path, script)
    # It failed now and then (SIGABRT at exit): the script now destroys its group and skips finalisation.
    assert result.returncode == 0, result.stderr[-3000:]
    got = _jsonl((tmp_path / "scores.jsonl").read_text())
    assert [r["path"] for r in got] == paths
    _assert_same_records(got, want)


def test_ray_and_spark_plug_in_scores_like_the_detector(bundle, inputs):
    from decodiff_cli import Detector

    example = _example("ray_spark_score")
    paths = sorted(str(p) for p in inputs.iterdir())
    want = list(Detector.load(bundle, device="cpu").predict(paths))
    got = example.ScoreBatch(str(bundle), device="cpu")({"path": paths})
    assert got["path"] == paths
    assert got["error"][-1] is not None and got["score"][-1] is None  # the unreadable file
    for p, score, anomalous in zip(want[:-1], got["score"], got["is_anomalous"]):
        assert abs(score - p.score) <= 1e-4 and anomalous == p.is_anomalous


def test_spark_partition_function_returns_one_frame_per_batch(bundle, inputs):
    pd = pytest.importorskip("pandas")
    example = _example("ray_spark_score")
    paths = sorted(str(p) for p in inputs.iterdir())
    (frame,) = example.spark_partition(str(bundle), device="cpu")(iter([pd.DataFrame({"path": paths})]))
    assert list(frame.columns) == list(example.COLUMNS) and frame["path"].tolist() == paths


def test_a_group_of_one_is_the_identity_and_the_timeout_is_checked(monkeypatch):
    from types import SimpleNamespace

    from decodiff_cli.distributed import ProcessGroup, timeout_seconds

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = ProcessGroup.from_environment()
    assert (group.size, group.index, group.is_main) == (1, 0, True)
    assert group.split([3, 1, 2]) == [3, 1, 2] and group.gather("x") == ["x"]
    assert group.on_main(lambda: 7) == 7 and group.device("auto") == "auto"
    # In a launch, each process takes its own accelerator unless the user named one.
    launched = ProcessGroup(SimpleNamespace(device=torch.device("cuda", 1), num_processes=2, process_index=1))
    assert launched.device("auto") == launched.device("cuda") == "cuda:1"
    assert launched.device("cpu") == "cpu" and launched.device("cuda:0") == "cuda:0"
    on_cpu = ProcessGroup(SimpleNamespace(device=torch.device("cpu"), num_processes=2, process_index=0))
    assert on_cpu.device("auto") == "cpu"

    monkeypatch.setenv("DECODIFF_DIST_TIMEOUT", "2.5")
    assert timeout_seconds() == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("DECODIFF_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="DECODIFF_DIST_TIMEOUT"):
            timeout_seconds()


@pytest.mark.parametrize("code, left", [(None, [0]), (0, [0]), (1, [1]), (3, [3]), (2, []), (130, [])])
def test_a_launched_run_that_finished_leaves_with_its_code_past_finalisation(monkeypatch, code, left):
    from decodiff_cli import console, distributed

    assert set(distributed.FINISHED) == {None, console.EXIT_OK, console.EXIT_ANOMALY, console.EXIT_INPUTS_FAILED}
    exits = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(os, "_exit", exits.append)
    distributed.leave_launch(code)
    assert exits == left  # a usage error or an interruption returns, to exit the usual way


@pytest.mark.parametrize("world_size, argv, left", [
    ("2", ["--version"], [0]),  # launched, succeeded: leaves at once, past the interpreter's finalisation
    ("2", ["info", "no-such-bundle"], []),  # launched, failed: exits the usual way with its code
    ("1", ["--version"], []),  # not launched: the usual way
])
def test_the_command_skips_finalisation_only_after_a_launched_success(monkeypatch, tmp_path, world_size, argv, left):
    from decodiff_cli.cli import main

    class Left(Exception):
        pass

    exits = []

    def leave(code):
        exits.append(code)
        raise Left

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(os, "_exit", leave)
    monkeypatch.setattr(sys, "argv", ["decodiff", *argv])
    with pytest.raises(Left if left else SystemExit) as done:
        main()
    assert exits == left
    if not left:
        assert (done.value.code not in (None, 0)) == (argv[0] == "info")
