"""A unified model trained on two classes: scoring with the class given, and inferred."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from decodiff_cli.config import MapConfig
from decodiff_cli.detector import Detector
from decodiff_cli.fitting import fit


def _folder(root: Path, name: str, colour: tuple[int, int, int], count: int = 8) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    for i in range(count):
        noise = rng.integers(-12, 12, (64, 64, 3))
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module", params=[(True, "none"), (False, "none"), (False, "position"), (True, "position")],
                ids=["conditional", "unconditional", "unconditional-reference", "conditional-reference"])
def unified(request, tmp_path_factory):
    """With a map reference, each class has its own: the class decides the map, not only the threshold."""
    conditional, reference = request.param
    root = tmp_path_factory.mktemp("unified")
    images = {name: sorted(_folder(root / "data", name, colour).glob("*.png"))
              for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200)))}
    out = root / "model"
    cfg = tiny_config(max_steps=10)
    cfg.anomaly_map = MapConfig(reference=reference)
    fit(images, out, cfg, class_conditional=conditional)
    return Detector.load(out, device="cpu"), root / "data"


def test_unified_bundle_knows_both_classes(unified):
    detector, _ = unified
    assert detector.categories == ["blue", "red"]
    assert set(detector.thresholds) == {"blue", "red"}


def test_class_from_the_path_or_given(unified):
    detector, data = unified
    red = str(data / "red" / "000.png")
    (from_path,) = detector.predict([red])
    (given,) = detector.predict([red], category="blue")
    assert from_path.category == "red" and given.category == "blue"
    assert np.isfinite(from_path.score) and np.isfinite(given.score)


def test_class_inferred_when_nothing_says_it(unified):
    """A PIL image has no path: its class is the nearest class centroid of its latent,
    and its score is that class's score."""
    detector, data = unified
    for name in ("red", "blue"):
        image = Image.open(data / name / "001.png")
        (inferred,) = detector.predict([image])
        (explicit,) = detector.predict([image], category=name)
        assert inferred.category == name
        assert inferred.score == pytest.approx(explicit.score, rel=1e-5)


def test_inferred_class_does_not_follow_the_anomaly(unified):
    """A red image with a large blue patch is an anomalous *red* image: the lowest
    normalised score might well be blue's, the centroid still says red."""
    detector, data = unified
    image = np.asarray(Image.open(data / "red" / "002.png")).copy()
    image[16:40, 16:40] = (40, 40, 200)
    (result,) = detector.predict([image])
    assert result.category == "red"


def test_mixed_batch_keeps_the_order(unified):
    detector, data = unified
    images = [Image.open(data / name / "003.png") for name in ("red", "blue", "red", "blue")]
    results = list(detector.predict(images))
    assert [r.category for r in results] == ["red", "blue", "red", "blue"]
    for image, result in zip(images, results):
        (explicit,) = detector.predict([image], category=result.category)
        assert result.score == pytest.approx(explicit.score, rel=1e-5)


def test_unknown_class_lists_the_known_ones(unified):
    detector, _ = unified
    with pytest.raises(ValueError, match="blue, red"):
        list(detector.predict([np.zeros((64, 64, 3), np.uint8)], category="green"))
