"""Training for real, on a tiny model: resume, time budget, on-disk cache, two processes.

Every run trains the `tiny` denoiser on 12 synthetic 64x64 images with the weight-free
`pixel` autoencoder (9 train, 3 held out; global batch 4 -> 3 steps per epoch, the last of 1 image). The
uninterrupted 12-step run (`baseline`) is the reference the others are compared with:

* interrupted at step 5 and resumed -> bit-identical weights, the log continues at step 5;
* the latent cache on disk (memmap) instead of in RAM -> bit-identical weights;
* `accelerate launch --multi_gpu --num_processes 2` on the CPU -> the same 12 optimiser
  steps, the two processes train on disjoint shares of each of the baseline's batches,
  and one bundle, one log, one summary.

(`accelerate launch --cpu --num_processes 2` starts only *one* process unless accelerate
is given an mpirun hostfile; `--multi_gpu` on a machine without a GPU starts two, which
decodiff turns into a CPU (gloo) process group: see fitting.cpu_only_launch.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Events, tiny_config
from decodiff_cli import latent_cache
from decodiff_cli.bundle import DENOISER, TRAINING_LOG
from decodiff_cli.detector import Detector
from decodiff_cli.fitting import fit, work_dir_for
from decodiff_cli.latent_cache import LatentCache
from decodiff_cli.presets import build_config
from decodiff_cli.training import TrainingInterrupted, _StopFlag, _truncate_log, batch_rows

STEPS = 12
# map_reference none, no novelty term: _record_rows counts every read of the latent cache,
# and the "auto" map reference (to measure alignment) and the novelty term (to store normal
# latents) read it too.
OPTIONS = dict(autoencoder="pixel", model_size="tiny", image_size=64, batch_size=4, seed=0, map_reference="none",
               map_novelty=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads per process
    spin against other work and make these runs 10x slower; one thread also keeps
    the in-process runs' arithmetic identical to each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """12 smooth random textures (a real dataset is not needed to test the machinery)."""
    folder = tmp_path_factory.mktemp("data") / "good"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):
        coarse = rng.uniform(40, 215, (8, 8, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((64, 64), Image.BILINEAR)
        image.save(folder / f"{index:03d}.png")
    return folder


def _images(folder: Path) -> dict[str, list[Path]]:
    return {"good": sorted(folder.glob("*.png"))}


def _cfg(**extra):
    return build_config("cpu", {**OPTIONS, **extra})


def _log(bundle_or_file: Path) -> list[dict]:
    path = bundle_or_file / TRAINING_LOG if bundle_or_file.is_dir() else bundle_or_file
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(bundle / DENOISER))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensor(s) differ, e.g. {different[:3]}"


def _record_rows(monkeypatch) -> list[list[int]]:
    """The image rows of every training batch, in order (the loop reads each through
    LatentCache.batch exactly once per step)."""
    rows: list[list[int]] = []
    original = LatentCache.batch

    def batch(self, images, views):
        rows.append(images.tolist())
        return original(self, images, views)

    monkeypatch.setattr(LatentCache, "batch", batch)
    return rows


@pytest.fixture(scope="module")
def baseline(images, tmp_path_factory):
    """The uninterrupted reference run: (bundle, rows of each step, wall seconds)."""
    out = tmp_path_factory.mktemp("baseline") / "model"
    with pytest.MonkeyPatch.context() as mp:
        rows = _record_rows(mp)
        start = time.monotonic()
        result = fit(_images(images), out, _cfg(max_steps=STEPS))
        seconds = time.monotonic() - start
    assert result.steps == STEPS and len(rows) == STEPS
    return out, rows, seconds


def test_batch_rows_split_the_global_batch_between_processes():
    for step in range(7):  # 3 epochs of 9 images in batches of 4 (2 steps each)
        whole = batch_rows(step, 9, 4, 2, seed=3, rank=0, world=1).tolist()
        halves = [batch_rows(step, 9, 4, 2, seed=3, rank=r, world=2).tolist() for r in range(2)]
        assert len(whole) == 4 and [len(h) for h in halves] == [2, 2]
        assert halves[0] + halves[1] == whole
    epoch = [batch_rows(s, 9, 4, 2, seed=3, rank=0, world=1).tolist() for s in (0, 1)]
    assert len(set(epoch[0] + epoch[1])) == 8  # no image twice within an epoch


@pytest.mark.slow
def test_uninterrupted_run_writes_a_loadable_bundle_and_logs_the_last_step(baseline, images):
    out, rows, _ = baseline
    assert not work_dir_for(out).exists()  # checkpoints and cache are gone with success
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temporary folders
    log = _log(out)
    assert [r["step"] for r in log] == [1, 10, STEPS]  # every 10th step, and the last one
    assert all(r["processes"] == 1 and r["max_steps"] == STEPS for r in log)
    detector = Detector.load(out, device="cpu")
    (prediction,) = list(detector.predict([str(_images(images)["good"][0])]))
    assert prediction.error is None and np.isfinite(prediction.score)


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_uninterrupted_weights(baseline, images, tmp_path):
    reference, reference_rows, _ = baseline
    out = tmp_path / "model"
    with pytest.raises(TrainingInterrupted) as stopped:
        fit(_images(images), out, _cfg(max_steps=STEPS), should_stop=lambda step: step == 5)
    assert stopped.value.step == 5
    checkpoint = work_dir_for(out) / "checkpoint"
    assert stopped.value.checkpoint == checkpoint
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 5
    assert not out.exists()
    assert [r["step"] for r in _log(work_dir_for(out) / TRAINING_LOG)] == [1]

    steps: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        rows = _record_rows(mp)
        result = fit(_images(images), out, _cfg(max_steps=STEPS), resume=True,
                     progress=Events(lambda kind, info: steps.append(info["step"]) if kind == "step" else None))
    assert steps == list(range(6, STEPS + 1))  # continues from the saved step, not from 0
    assert rows == reference_rows[5:]  # and with the batches the uninterrupted run had
    assert result.steps == STEPS
    assert not work_dir_for(out).exists()

    _assert_same_weights(out, reference)  # the EMA weights: model, optimiser, EMA, lr all restored
    log, ref_log = _log(out), _log(reference)
    assert [r["step"] for r in log] == [1, 10, STEPS]  # one log across both runs, no repeats
    for mine, theirs in zip(log, ref_log):
        assert (mine["loss"], mine["lr"]) == (theirs["loss"], theirs["lr"])


def test_resume_needs_a_checkpoint(images, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        fit(_images(images), tmp_path / "model", _cfg(max_steps=2), resume=True)


def test_resume_drops_log_records_past_the_checkpoint(tmp_path):
    """A run killed outright may have logged steps after its last checkpoint."""
    log = tmp_path / "training_log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 10, 20, 30)) + '{"step": 4')
    _truncate_log(log, 20)
    assert [r["step"] for r in _log(log)] == [1, 10, 20]


def test_sigterm_raises_the_stop_flag():
    with _StopFlag() as stop:
        assert not stop.raised
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.raised
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # the old handler is back


BUDGET_MIN = 0.1  # 6 seconds


@pytest.fixture(scope="module")
def budget_run(images, tmp_path_factory):
    """A --time-budget fit: (bundle, FitResult, wall seconds of the whole fit)."""
    out = tmp_path_factory.mktemp("budget") / "model"
    start = time.monotonic()
    result = fit(_images(images), out, _cfg(time_budget=BUDGET_MIN))
    return out, result, time.monotonic() - start


@pytest.mark.slow
def test_time_budget_covers_everything_fit_does(budget_run):
    out, result, seconds = budget_run
    assert not work_dir_for(out).exists()
    # training stopped early enough for the statistics, the calibration and the bundle to fit
    # too (a generous margin: the machine is shared)
    assert seconds <= BUDGET_MIN * 60 * 1.25, f"fit took {seconds:.1f} s of a {BUDGET_MIN * 60:.0f} s budget"
    last = _log(out)[-1]
    assert 0.6 <= last["budget_s"] < BUDGET_MIN * 60
    assert result.steps >= 1 and last["step"] == result.steps
    Detector.load(out, device="cpu")


@pytest.mark.slow
def test_time_budget_records_the_steps_that_replay_it(budget_run, images, tmp_path):
    out, result, _ = budget_run
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["steps_done"] == result.steps >= 1
    assert train["max_steps"] >= 1  # the planned length the lr followed, not the clock
    assert (train["stop_step"] or train["max_steps"]) == result.steps  # where the run ended, if not at the plan
    assert _log(out)[-1]["max_steps"] == train["max_steps"]
    options = dict(max_steps=train["max_steps"], views=train["augment_variants"], seed=train["seed"])
    if train["stop_step"]:  # the clock cut the plan short, or the run went on past it
        options["stop_step"] = train["stop_step"]
    replay = tmp_path / "replay"
    fit(_images(images), replay, _cfg(**options))
    _assert_same_weights(replay, out)


@pytest.mark.slow
def test_latent_cache_on_disk_trains_the_same_model(baseline, images, tmp_path, monkeypatch):
    monkeypatch.setattr(latent_cache, "RAM_LIMIT_BYTES", 1024)  # any real cache is larger
    events: dict[str, dict] = {}
    out = tmp_path / "model"
    fit(_images(images), out, _cfg(max_steps=STEPS), progress=Events(lambda kind, info: events.setdefault(kind, info)))
    assert events["cache"]["on_disk"] is True
    assert not work_dir_for(out).exists()  # the .npy cache went with the work folder
    _assert_same_weights(out, baseline[0])  # float16 latents, in RAM or memory-mapped
    Detector.load(out, device="cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flag(option: str, value) -> str:
    name = option.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name}={value}"


SHIM = """
import json, os, sys
from decodiff_cli.latent_cache import LatentCache

_batch = LatentCache.batch

def batch(self, images, views):  # record which rows this rank trains on
    with open(os.path.join(os.environ["ROWS_DIR"], "rank%s.jsonl" % os.environ["RANK"]), "a") as f:
        f.write(json.dumps(images.tolist()) + "\\n")
    return _batch(self, images, views)

LatentCache.batch = batch
sys.argv[0] = "decodiff"
from decodiff_cli.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_two_processes_make_the_same_steps_and_one_bundle(baseline, images, tmp_path):
    reference, reference_rows, one_process_s = baseline
    shim = tmp_path / "decodiff_shim.py"
    shim.write_text(SHIM)
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "model"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "DECODIFF_")) and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HOME=str(tmp_path / "hf"),  # no GPU, no accelerate config file
               OMP_NUM_THREADS="1", DECODIFF_NO_PROGRESS="1", ROWS_DIR=str(rows_dir))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(shim),
               "fit", str(images), "--out", str(out), "--max-steps", str(STEPS),
               *[_flag(k, v) for k, v in OPTIONS.items()]]
    start = time.monotonic()
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group: a hang takes no workers along
    try:
        stdout, stderr = launcher.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail("accelerate launch did not finish in 100 s")
    two_process_s = time.monotonic() - start
    print(f"wall time: one process (in-process fit) {one_process_s:.1f} s, two processes (launch) {two_process_s:.1f} s")
    assert launcher.returncode == 0, stderr[-3000:]

    # one writer: one bundle, no temporary folders, no work folder, one summary
    assert sorted(p.name for p in runs.iterdir()) == ["model"]
    assert stderr.count(f"trained {STEPS} steps") == 1, stderr[-3000:]
    log = _log(out)
    assert [r["step"] for r in log] == [r["step"] for r in _log(reference)] == [1, 10, STEPS]
    assert all(r["processes"] == 2 for r in log)

    # the data are split: each step, the ranks take disjoint shares of the one-process batch
    # (the epoch's last batch of 1 row: one rank has it, the other a zero-weight stand-in)
    ranks = [[json.loads(line) for line in (rows_dir / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == STEPS
    for step in range(STEPS):
        assert 0 <= len(ranks[0][step]) - len(ranks[1][step]) <= 1
        assert ranks[0][step] + ranks[1][step] == reference_rows[step]

    detector = Detector.load(out, device="cpu")
    (prediction,) = list(detector.predict([str(_images(images)["good"][0])]))
    assert prediction.error is None and np.isfinite(prediction.score)


def test_noised_elements_can_weigh_more_in_the_loss():
    from decodiff_cli.training import element_weights

    kept = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert torch.equal(element_weights(kept, 1.0), torch.ones_like(kept))  # the default: the plain mean
    assert torch.equal(element_weights(kept, 4.0), torch.tensor([[[[1.0, 4.0], [4.0, 1.0]]]]))
    assert build_config("cpu", {"noised_weight": 4.0}).train.noised_weight == 4.0


def test_a_model_that_predicts_the_clean_latent_trains_and_scores(invoke, tmp_path, category_dir, test_images):
    from decodiff_cli.inputs import find_training_images

    cfg = tiny_config(max_steps=3)
    cfg.denoiser.prediction = "clean"
    images, _ = find_training_images([str(category_dir)])
    fit(images, tmp_path / "model", cfg)
    detector = Detector.load(tmp_path / "model", device="cpu")
    assert detector.bundle.config.denoiser.prediction == "clean"
    (prediction,) = list(detector.predict(test_images[:1]))
    assert prediction.error is None and np.isfinite(prediction.score)
    assert "predicts the clean latent" in " ".join(invoke("info", tmp_path / "model").stdout.split())
    assert build_config("cpu", {"prediction": "clean"}).denoiser.prediction == "clean"
    with pytest.raises(ValueError, match="prediction must be one of deviation, clean"):
        build_config("cpu", {"prediction": "x0"})
