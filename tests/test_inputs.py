"""inputs.py: command-line items -> image paths, problems reported rather than raised."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from decodiff_cli.inputs import (
    IMAGE_SUFFIXES,
    InputImage,
    expand_inputs,
    find_training_images,
)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # nothing here opens images: any bytes will do
    return path


@pytest.fixture
def tree(tmp_path):
    for rel in ("b.png", "a.JPG", "notes.txt", "sub/c.tiff", "sub/deeper/d.webp", ".hidden.png"):
        touch(tmp_path / "data" / rel)
    return tmp_path / "data"


def names(images: list[InputImage]) -> list[str]:
    return [im.relative.as_posix() for im in images]


def test_suffixes_are_lower_case_with_dot():
    expected = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
    assert expected <= IMAGE_SUFFIXES


def test_folder_recursive_sorted_filtered(tree):
    images, problems = expand_inputs([str(tree)])
    assert problems == []
    assert names(images) == ["a.JPG", "b.png", "sub/c.tiff", "sub/deeper/d.webp"]
    assert all(im.root == tree for im in images)
    assert expand_inputs([str(tree)])[0] == images  # deterministic


def test_explicit_file_kept_whatever_its_suffix(tree):
    images, problems = expand_inputs([str(tree / "notes.txt"), str(tree / "sub" / "c.tiff")])
    assert problems == []
    assert [im.path.name for im in images] == ["notes.txt", "c.tiff"]
    assert images[0].root is None and images[0].relative == Path("notes.txt")


def test_globs(tree):
    images, problems = expand_inputs([str(tree / "*.png"), str(tree / "**" / "*.webp")])
    assert problems == []
    assert [im.path.name for im in images] == ["b.png", "d.webp"]
    assert all(im.root is None for im in images)
    images, _ = expand_inputs([str(tree / "*")])  # matched folders are walked
    assert sorted(im.path.name for im in images) == ["a.JPG", "b.png", "c.tiff", "d.webp"]
    images, problems = expand_inputs([str(tree / "*.bmp")])
    assert images == [] and "no file matches" in problems[0][1]


def test_stdin_paths(tree):
    stdin = io.StringIO(f"{tree / 'b.png'}\n\n   \n{tree / 'sub'}\n{tree / 'nope.png'}\n")
    images, problems = expand_inputs(["-"], stdin=stdin)
    assert [im.path.name for im in images] == ["b.png", "c.tiff", "d.webp"]
    assert images[0].root is None and images[1].root == tree / "sub"
    assert problems == [(str(tree / "nope.png"), f"'{tree / 'nope.png'}' does not exist.")]


def test_missing_and_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "textonly" / "readme.txt")
    items = [str(tmp_path / p) for p in ("missing", "empty", "textonly")]
    images, problems = expand_inputs(items)
    assert images == []
    assert [item for item, _ in problems] == items
    assert "does not exist" in problems[0][1] and "no images" in problems[1][1]


def test_broken_symlinks_are_problems(tree):
    (tree / "gone.png").symlink_to(tree / "nowhere.png")
    images, problems = expand_inputs([str(tree / "gone.png")])
    assert images == [] and "broken symbolic link" in problems[0][1]
    images, problems = expand_inputs([str(tree)])  # inside a folder too
    assert len(images) == 4 and "broken symbolic link" in problems[0][1]


def test_symlink_loop_terminates(tree):
    (tree / "sub" / "loop").symlink_to(tree, target_is_directory=True)
    (tree / "sub" / "self").symlink_to(tree / "sub", target_is_directory=True)
    images, problems = expand_inputs([str(tree)])
    assert problems == [] and len(images) == 4


def test_duplicates_dropped(tree):
    (tree / "link.png").symlink_to(tree / "b.png")
    again = str(tree / "sub" / ".." / "b.png")
    items = [str(tree / "b.png"), str(tree), str(tree / "link.png"), again]
    images, _ = expand_inputs(items)
    assert [im.path.name for im in images] == ["b.png", "a.JPG", "c.tiff", "d.webp"]
    assert images[0].root is None  # the first mention wins


def test_non_utf8_names_do_not_crash(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    try:
        open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb").close()
        os.symlink(b"/nowhere", os.path.join(os.fsencode(folder), b"bad\xff.png"))
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    images, problems = expand_inputs([str(folder)])
    assert len(images) == 1 and os.fsencode(images[0].path).endswith(b"caf\xe9.png")
    assert len(problems) == 1
    problems[0][1].encode("utf-8")  # the sentence is printable as it is


# ------------------------------------------------------------------------ training


def mvtec(root: Path, categories=("bottle", "cable")) -> Path:
    for cat in categories:
        for i in range(2):
            touch(root / cat / "train" / "good" / f"{i:03d}.png")
        touch(root / cat / "test" / "crack" / "000.png")  # must never be trained on
        touch(root / cat / "ground_truth" / "crack" / "000_mask.png")
    touch(root / "license.txt")
    return root


def test_mvtec_root_with_two_categories(tmp_path):
    root = mvtec(tmp_path / "mvtec")
    found, problems = find_training_images([str(root)])
    assert problems == [] and list(found) == ["bottle", "cable"]
    assert [p.relative_to(root).as_posix() for p in found["cable"]] == [
        "cable/train/good/000.png",
        "cable/train/good/001.png",
    ]


def test_single_category_and_its_train_folders(tmp_path):
    root = mvtec(tmp_path / "mvtec")
    for item in (root / "bottle", root / "bottle" / "train", root / "bottle" / "train" / "good"):
        found, problems = find_training_images([str(item)])
        assert problems == [] and list(found) == ["bottle"] and len(found["bottle"]) == 2
    found, _ = find_training_images([str(root / "*")])  # a glob over categories
    assert list(found) == ["bottle", "cable"] and len(found["cable"]) == 2


def test_plain_folders_files_and_globs(tmp_path, tree):
    touch(tmp_path / "screws" / "s1.png")
    items = [tree, tmp_path / "screws" / "s1.png", tree / "sub" / "*.tiff", tmp_path / "nope"]
    found, problems = find_training_images([str(i) for i in items])
    assert list(found) == ["data", "screws", "sub"]
    assert len(found["data"]) == 4 and len(found["sub"]) == 1
    assert [item for item, _ in problems] == [str(tmp_path / "nope")]


def test_generated_example_dataset(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "make_dataset.py"
    spec = importlib.util.spec_from_file_location("make_dataset", path)
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    md.make_dataset(tmp_path / "ds", "tile", n_train=2, n_test=1, size=16)
    found, problems = find_training_images([str(tmp_path / "ds")])
    assert problems == [] and {c: len(v) for c, v in found.items()} == {"tile": 2}


def test_bundle_given_as_data(tmp_path):
    bundle = tmp_path / "model"
    touch(bundle / "config.json")
    touch(bundle / "denoiser.safetensors")
    with pytest.raises(ValueError, match=f"{bundle} is a decodiff bundle, not a folder of images"):
        find_training_images([str(bundle)])
