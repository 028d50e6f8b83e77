"""Shared fixtures for the CLI and reliability tests.

Built once per session: a tiny synthetic MVTec-style dataset (examples/make_dataset.py)
and a tiny trained bundle (pixel autoencoder, tiny denoiser, 64 px, 20 steps), made by
calling ``decodiff_cli.fitting.fit`` directly. Commands run in-process through typer's
CliRunner; only tests that need a real process (signals, concurrency) start one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ["DECODIFF_NO_PROGRESS"] = "1"
# One intra-op thread, here and in the processes the tests start: the models are tiny, and
# on a shared, oversubscribed CPU torch's spinning worker threads make each forward pass
# 10-100x slower (measured: 35 ms with one thread, 0.2-5 s with two).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from decodiff_cli import cli  # noqa: E402,F401
from decodiff_cli.progress import FitProgress  # noqa: E402
from decodiff_cli.config import (  # noqa: E402
    AutoencoderConfig,
    DenoiserConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
)

REPO = Path(__file__).resolve().parents[1]
CATEGORY = "tile"
SIZE = 64
N_TRAIN = 16
N_TEST = 2  # 2 good + 4 defective test images (one per defect kind)


def _load_make_dataset():
    spec = importlib.util.spec_from_file_location("decodiff_example_make_dataset", REPO / "examples" / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_dataset


def as_format_1(config: dict) -> dict:
    """A config.json as decodiff 0.2.0 wrote it (format 1): what fit measured lay among the
    map's settings (alignment, feature and novelty scales) and at the top (class centroids)."""
    old = {key: value for key, value in config.items() if key != "measured"}
    old["anomaly_map"] = {**config["anomaly_map"], **{key: config["measured"][key]
                                                      for key in ("alignment", "feature_scales", "novelty_scales")}}
    old["class_centroids"] = config["measured"]["class_centroids"]
    old["format_version"] = 1
    return old


def tiny_config(max_steps: int = 20) -> ModelConfig:
    """What `decodiff fit --autoencoder pixel --model-size tiny --image-size 64
    --batch-size 4 --max-steps N` builds, with a short warm-up."""
    return ModelConfig(
        preprocess=PreprocessConfig(image_size=SIZE, resize=SIZE),
        autoencoder=AutoencoderConfig(spec="pixel"),
        denoiser=DenoiserConfig(size="tiny"),
        train=TrainConfig(batch_size=4, max_steps=max_steps, warmup_steps=5),
    )


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """OUT of make_dataset: OUT/tile/{train/good, test/<defect>, ground_truth/<defect>}."""
    out = tmp_path_factory.mktemp("synth") / "mvtec"
    _load_make_dataset()(out, CATEGORY, N_TRAIN, N_TEST, SIZE, 0)
    return out


@pytest.fixture(scope="session")
def category_dir(synth_root) -> Path:
    return synth_root / CATEGORY


@pytest.fixture(scope="session")
def test_images(category_dir) -> list[Path]:
    return sorted((category_dir / "test").rglob("*.png"))


@pytest.fixture(scope="session")
def good_images(category_dir) -> list[Path]:
    return sorted((category_dir / "test" / "good").glob("*.png"))


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, category_dir) -> Path:
    """A trained, calibrated bundle. Tests must not modify it (copy it first)."""
    from decodiff_cli.fitting import fit
    from decodiff_cli.inputs import find_training_images

    images, problems = find_training_images([str(category_dir)])
    assert not problems and len(images[CATEGORY]) == N_TRAIN
    out = tmp_path_factory.mktemp("bundles") / "model"
    fit(images, out, tiny_config())
    return out


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    """A private copy of the session bundle, free to alter."""
    target = tmp_path / "model_copy"
    shutil.copytree(bundle, target)
    return target


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner):
    """invoke(*args, input=None) -> click Result of `decodiff ARGS`, run in-process."""

    def run(*args, input=None):
        return runner.invoke(cli.app, [os.fspath(a) if isinstance(a, os.PathLike) else a for a in args],
                             input=input, env={"DECODIFF_NO_PROGRESS": "1"})

    return run


def decodiff_process(*args, **popen_kw) -> subprocess.Popen:
    """`decodiff ARGS` as a real process (python -m, so no PATH lookup)."""
    env = {**os.environ, "DECODIFF_NO_PROGRESS": "1"}
    env.pop("DECODIFF_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "decodiff_cli", *map(os.fspath, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_kw)


class Events(FitProgress):
    """A FitProgress that hands each event to ``callback(kind, info)``: tests look at the
    events by name."""

    def __init__(self, callback) -> None:
        self.callback = callback

    def note(self, message):
        self.callback("note", {"message": message})

    def skipped(self, path, reason):
        self.callback("skipped", {"path": path, "reason": reason})

    def images(self, train, holdout, categories, skipped):
        self.callback("images", {"train": train, "holdout": holdout, "categories": categories, "skipped": skipped})

    def encoding(self, done, total):
        self.callback("encode", {"done": done, "total": total})

    def cache(self, nbytes, on_disk, images, views):
        self.callback("cache", {"bytes": nbytes, "on_disk": on_disk, "images": images, "views": views})

    def alignment(self, alignment, aligned):
        self.callback("alignment", {"alignment": alignment, "aligned": aligned})

    def novelty(self, images):
        self.callback("novelty", {"images": images})

    def budget_warning(self, minutes, spent_s, after_s, training_s):
        self.callback("warning", {"minutes": minutes, "spent_s": spent_s, "after_s": after_s, "training_s": training_s})

    def step(self, record):
        self.callback("step", record)

    def reference(self, images):
        self.callback("reference", {"images": images})

    def calibrate(self, images):
        self.callback("calibrate", {"images": images})
