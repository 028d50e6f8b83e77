"""examples/make_dataset.py: the MVTec AD layout, exact 0/255 masks, determinism."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_PATH = Path(__file__).resolve().parents[1] / "examples" / "make_dataset.py"


def _module():
    spec = importlib.util.spec_from_file_location("make_dataset", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


md = _module()


def test_layout_and_masks(tmp_path):
    root = md.make_dataset(tmp_path / "ds", "weave", n_train=3, n_test=4, size=64, seed=1)
    assert root == tmp_path / "ds" / "weave"
    train = sorted(p.name for p in (root / "train" / "good").iterdir())
    assert train == ["000.png", "001.png", "002.png"]
    assert len(list((root / "test" / "good").iterdir())) == 4
    defective = sorted((root / "test").glob("[!g]*/*.png"))
    assert len(defective) == 8  # 2 x n_test, spread over the kinds
    assert {p.parent.name for p in defective} == set(md.DEFECTS)
    for img_path in defective:
        mask_path = root / "ground_truth" / img_path.parent.name / f"{img_path.stem}_mask.png"
        mask = np.asarray(Image.open(mask_path))
        img = Image.open(img_path)
        assert img.mode == "RGB" and img.size == (64, 64) and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 255}
        assert 0 < (mask > 0).mean() < 0.2
    assert not (root / "ground_truth" / "good").exists()


def test_mask_marks_exactly_the_changed_pixels():
    for kind in md.DEFECTS:
        base = md.normal_image(np.random.default_rng(0), 64)
        img, mask = md.add_defect(np.random.default_rng(5), base, kind)
        changed = np.abs(img - base).max(axis=2) > 0
        assert not changed[~mask].any()  # nothing outside the mask moved
        assert changed[mask].mean() > 0.9  # and (nearly) every masked pixel did


def test_deterministic_and_refuses_to_overwrite(tmp_path):
    a = md.make_dataset(tmp_path / "a", n_train=2, n_test=1, size=32, seed=3)
    b = md.make_dataset(tmp_path / "b", n_train=3, n_test=1, size=32, seed=3)
    for rel in ("train/good/001.png", "test/good/000.png", "ground_truth/stain/000_mask.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        md.make_dataset(tmp_path / "a", n_train=1, n_test=0, size=32)
    assert md.main([str(tmp_path / "a"), "--train", "1", "--test", "0", "--size", "32"]) == 2
    md.make_dataset(tmp_path / "a", n_train=1, n_test=0, size=32, overwrite=True)
    assert len(list((a / "train" / "good").iterdir())) == 1 and not (a / "test").exists()
