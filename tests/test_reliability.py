"""Issue 6's reliability matrix: every bad input gets a one-line message naming it and the
documented exit code, and the rest of the batch is still processed.

Exit codes (console.py): 0 ok; 1 anomalies (--fail-on-anomaly); 2 usage error (bad
options, bundle or data: nothing done); 3 some inputs failed, the others were processed;
130 interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from conftest import CATEGORY, decodiff_process

TINY_FIT = ("--autoencoder", "pixel", "--model-size", "tiny", "--image-size", "64", "--batch-size", "4")


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def good(good_images, tmp_path) -> Path:
    """One normal image, in a folder of its own."""
    path = tmp_path / "ok" / "good.png"
    path.parent.mkdir()
    shutil.copy(good_images[0], path)
    return path


@pytest.fixture
def score(invoke, bundle):
    """score(*items) -> (result, records by file name) of `decodiff score BUNDLE ITEMS --format jsonl`."""

    def run(*items, extra=()):
        result = invoke("score", bundle, *items, "--format", "jsonl", *extra)
        assert "Traceback" not in result.output, result.output
        return result, {os.fsencode(Path(r["path"]).name): r for r in jsonl(result.stdout)}

    return run


def assert_failed_one(result, records, bad: Path, problem: str, ok: Path) -> None:
    """Exit 3; one stderr line names ``bad`` and says ``problem``; ``ok`` was scored."""
    assert result.exit_code == 3, result.output
    name = os.fsdecode(bad.name)
    lines = [line for line in result.stderr.splitlines() if name in line]
    assert len(lines) == 1, result.stderr
    assert problem in lines[0], lines[0]
    assert lines[0].startswith("warning: ")
    good = records[os.fsencode(ok.name)]
    assert good["error"] is None and math.isfinite(good["score"]), good


def assert_scored(result, records, *paths: Path) -> None:
    assert result.exit_code == 0, result.output
    for path in paths:
        record = records[os.fsencode(path.name)]
        assert record["error"] is None and math.isfinite(record["score"]), record


def assert_usage_error(result, *texts: str) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr  # progress lines (fit) may come first
    message = errors[0]
    for text in texts:
        assert text in message, message
    assert "Traceback" not in result.output


def rewrite_checksum(bundle: Path, name: str) -> None:
    sums = json.loads((bundle / "checksums.json").read_text())
    sums[name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / "checksums.json").write_text(json.dumps(sums))


# ------------------------------------------------------------------------ unreadable files


def test_zero_byte_file(score, good, tmp_path):
    bad = tmp_path / "empty.png"
    bad.touch()
    assert_failed_one(*score(good, bad), bad, "the file is empty", good)


def test_truncated_png(score, good, tmp_path):
    bad = tmp_path / "cut.png"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    result, records = score(good, bad)
    assert_failed_one(result, records, bad, "truncated or corrupt", good)
    assert "cut.png" in records[b"cut.png"]["error"] and records[b"cut.png"]["score"] is None


def test_truncated_jpeg(score, good, tmp_path):
    whole = tmp_path / "whole.jpg"
    Image.open(good).save(whole, quality=90)
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_failed_one(*score(good, bad), bad, "truncated or corrupt", good)


JPEG_CUT_IN_ITS_HEADER = bytes.fromhex("ffd8ffe000104a46494600")  # Pillow: a bare OSError (issue 17)


def assert_warned_once(result, bad: Path, problem: str) -> None:
    """Exit 3 and one `warning:` line naming ``bad`` and saying ``problem``."""
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if bad.name in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and problem in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_jpeg_cut_inside_its_header_in_every_command(invoke, score, bundle, good, tmp_path):
    bad = tmp_path / "cut_header.jpg"
    bad.write_bytes(JPEG_CUT_IN_ITS_HEADER)
    assert_failed_one(*score(good, bad), bad, "truncated or corrupt (Truncated File Read)", good)
    for command, product in (("localize", "good_heatmap.png"), ("export-masks", "good_mask.png")):
        result = invoke(command, bundle, good, bad, "--out", tmp_path / command)
        assert_warned_once(result, bad, "truncated or corrupt")
        assert (tmp_path / command / product).is_file()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_read_that_blocks_is_bounded_in_time(score, good, tmp_path, monkeypatch):
    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: none will
    monkeypatch.setenv("DECODIFF_READ_TIMEOUT", "0.5")
    began = time.monotonic()
    try:
        result, records = score(good, fifo)
    finally:
        try:  # a writer ends the abandoned reader's wait, so its thread ends with the test
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waits (the code under test did not open it)
            pass
    assert time.monotonic() - began < 60
    assert_failed_one(result, records, fifo, "took longer than 0.5 s", good)
    assert records[b"stuck.png"]["score"] is None


def test_fit_leaves_out_unreadable_files_and_names_each(invoke, category_dir, tmp_path, monkeypatch):
    from decodiff_cli import fitting

    data = tmp_path / "normal"
    shutil.copytree(category_dir / "train" / "good", data)
    cut = data / "cut_header.jpg"
    cut.write_bytes(JPEG_CUT_IN_ITS_HEADER)
    damaged = {}

    def split_then_damage(paths, *args):
        # After the check, before encoding and calibration: one training file disappears and
        # one held-out file is cut short (fit reads its files again when it uses them).
        train, holdout = real_split(paths, *args)
        damaged["train"], damaged["holdout"] = train[0], holdout[0]
        train[0].unlink()
        holdout[0].write_bytes(holdout[0].read_bytes()[:100])
        return train, holdout

    real_split = fitting.split_holdout
    monkeypatch.setattr(fitting, "split_holdout", split_then_damage)
    result = invoke("fit", data, "--out", tmp_path / "model", *TINY_FIT, "--max-steps", "2")
    for bad, problem in ((cut, "truncated or corrupt"), (damaged["train"], "does not exist"),
                         (damaged["holdout"], "truncated or corrupt")):
        assert_warned_once(result, bad, problem)
    assert "3 unreadable file(s) left out" in result.stderr
    assert (tmp_path / "model" / "denoiser.safetensors").is_file()
    monkeypatch.undo()
    strict = invoke("fit", data, "--out", tmp_path / "strict", *TINY_FIT, "--max-steps", "2", "--strict")
    assert_usage_error(strict, "cannot read image", "--strict stops at the first unreadable file")
    assert not (tmp_path / "strict").exists()


def test_calibrate_leaves_out_unreadable_files(invoke, bundle_copy, category_dir, good_images, tmp_path):
    normal, anomalous = tmp_path / "normal", tmp_path / "anomalous"
    shutil.copytree(category_dir / "test" / "good", normal)
    anomalous.mkdir()
    shutil.copy(next((category_dir / "test" / "stain").iterdir()), anomalous / "stain.png")
    (normal / "cut_header.jpg").write_bytes(JPEG_CUT_IN_ITS_HEADER)
    (anomalous / "cut_anomaly.png").write_bytes(b"\x89PNG\r\n")
    result = invoke("calibrate", bundle_copy, normal, "--anomalous", anomalous)
    assert_warned_once(result, normal / "cut_header.jpg", "truncated or corrupt")
    assert_warned_once(result, anomalous / "cut_anomaly.png", "cannot read image")
    entry = json.loads((bundle_copy / "calibration.json").read_text())["categories"][CATEGORY]
    assert entry["num_normal"] == len(good_images) and entry["rule"].startswith("f1-optimal")


def test_text_file_named_png(score, good, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    assert_failed_one(*score(good, bad), bad, "not an image format", good)


def test_directory_named_like_an_image(score, good, tmp_path):
    bad = tmp_path / "x.jpg"
    bad.mkdir()
    # Named explicitly, it is walked like any folder: it holds no images.
    assert_failed_one(*score(good, bad), bad, "contains no images", good)
    # Inside a folder being scored, it is a folder: nothing to report.
    shutil.copy(good, tmp_path / "a.png")
    result, records = score(tmp_path)
    assert_scored(result, records, tmp_path / "a.png")


def test_decompression_bomb(score, tmp_path, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 2000)
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (120, 90, 60)).save(small)  # 1024 pixels: fine
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64), (120, 90, 60)).save(bomb)  # 4096 > 2 x limit: Pillow's error
    near = tmp_path / "near.png"
    Image.new("RGB", (50, 50), (120, 90, 60)).save(near)  # 2500 > limit: Pillow only warns
    result, records = score(small, bomb, near)
    assert result.exit_code == 3
    for bad in (bomb, near):
        lines = [line for line in result.stderr.splitlines() if bad.name in line]
        assert len(lines) == 1 and "too large" in lines[0], result.stderr
    assert records[b"small.png"]["error"] is None


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (500, 1)])
def test_tiny_and_thin_images_are_scored(score, tmp_path, size):
    path = tmp_path / f"thin_{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (200, 160, 110)).save(path)
    assert_scored(*score(path), path)


# ------------------------------------------------------------------ unusual image kinds


def test_cmyk_jpeg(score, good, tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.open(good).convert("CMYK").save(path)
    assert Image.open(path).mode == "CMYK"
    assert_scored(*score(path, good), path, good)


def test_16_bit_greyscale_png_and_tiff(score, good, tmp_path):
    grey = np.asarray(Image.open(good).convert("L"))
    eight = tmp_path / "grey8.png"
    Image.fromarray(grey).save(eight)
    wide = (grey.astype(np.uint16) * 257).astype(np.uint16)  # the same levels over 0..65535
    png16, tiff16 = tmp_path / "grey16.png", tmp_path / "grey16.tiff"
    for path in (png16, tiff16):
        Image.fromarray(wide).save(path)
        assert Image.open(path).mode.startswith("I;16")
    result, records = score(eight, png16, tiff16)
    assert_scored(result, records, eight, png16, tiff16)
    # v * 257 / 257 = v: the 16-bit files are the 8-bit picture, not clipped at 255.
    assert records[b"grey16.png"]["score"] == pytest.approx(records[b"grey8.png"]["score"], rel=1e-5)
    assert records[b"grey16.tiff"]["score"] == pytest.approx(records[b"grey8.png"]["score"], rel=1e-5)


def test_palette_with_transparency(score, good, tmp_path):
    path = tmp_path / "palette.png"
    Image.open(good).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path, transparency=0)
    with Image.open(path) as im:
        assert im.mode == "P" and "transparency" in im.info
    assert_scored(*score(path), path)


def test_animated_gif_uses_first_frame(score, good, tmp_path):
    path = tmp_path / "anim.gif"
    first = Image.open(good).convert("RGB")
    second = Image.new("RGB", first.size, (255, 0, 0))
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 2
        im.seek(0)
        frame = tmp_path / "frame0.png"
        im.convert("RGB").save(frame)
    result, records = score(path, frame)
    assert_scored(result, records, path, frame)
    assert records[b"anim.gif"]["score"] == pytest.approx(records[b"frame0.png"]["score"], rel=1e-5)


def test_exif_rotated_jpeg(invoke, score, bundle, good, tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.open(good).convert("RGB").resize((80, 50)).save(path, exif=exif)
    assert_scored(*score(path), path)
    masks = tmp_path / "masks"
    done = invoke("export-masks", bundle, path, "--out", masks)
    assert done.exit_code == 0, done.output
    with Image.open(masks / "phone_mask.png") as mask:
        assert mask.size == (50, 80)  # the displayed (rotated) geometry, not the stored one


# ------------------------------------------------------------------- paths and file names


def test_broken_symlink(score, good, tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(good, folder / "fine.png")
    dangling = folder / "gone.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    result, records = score(folder)  # found while walking a folder
    assert_failed_one(result, records, dangling, "broken symbolic link", folder / "fine.png")
    result, records = score(good, dangling)  # named on the command line
    assert_failed_one(result, records, dangling, "broken symbolic link", good)


def test_symlink_loop_in_input_folder_terminates(score, good, tmp_path):
    from decodiff_cli.inputs import expand_inputs

    folder = tmp_path / "loops"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(good, folder / "top.png")
    shutil.copy(good, folder / "sub" / "inner.png")
    (folder / "sub" / "back").symlink_to(folder)  # sub/back -> the folder itself
    (folder / "self").symlink_to(".")  # self -> .
    found: list = []
    walker = threading.Thread(target=lambda: found.append(expand_inputs([str(folder)])), daemon=True)
    walker.start()
    walker.join(30)
    assert not walker.is_alive(), "walking a folder with a symlink loop did not terminate"
    images, problems = found[0]
    assert sorted(im.path.name for im in images) == ["inner.png", "top.png"] and not problems
    result, records = score(folder)
    assert_scored(result, records, folder / "top.png", folder / "sub" / "inner.png")
    assert len(jsonl(result.stdout)) == 2  # each image once


def test_non_utf8_file_name(invoke, score, bundle, good, tmp_path):
    raw = os.fsencode(tmp_path) + b"/part\xff.png"
    shutil.copy(good, raw)
    path = Path(os.fsdecode(raw))  # 'part\udcff.png': how Python spells undecodable bytes
    result, records = score(path)
    assert_scored(result, records, path)
    assert jsonl(result.stdout)[0]["path"] == str(path)  # the jsonl escapes round-trip
    out = tmp_path / "review"
    localized = invoke("localize", bundle, path, "--out", out)
    assert localized.exit_code == 0, localized.output
    assert os.path.isfile(os.fsencode(out) + b"/part\xff_heatmap.png")
    assert "part\ufffd.png" in (out / "index.html").read_text(encoding="utf-8")


def test_file_name_with_spaces(score, good, tmp_path):
    path = tmp_path / "my part (1).png"
    shutil.copy(good, path)
    result, records = score(path)
    assert_scored(result, records, path)
    assert jsonl(result.stdout)[0]["path"] == str(path)


def test_duplicate_names_in_different_folders_do_not_collide(invoke, score, bundle, good_images, tmp_path):
    a, b = tmp_path / "a" / "part.png", tmp_path / "b" / "part.png"
    for path, source in ((a, good_images[0]), (b, good_images[1])):
        path.parent.mkdir()
        shutil.copy(source, path)
    result = invoke("score", bundle, a, b, "--format", "jsonl")
    assert result.exit_code == 0
    assert [r["path"] for r in jsonl(result.stdout)] == [str(a), str(b)]
    out = tmp_path / "review"
    localized = invoke("localize", bundle, a, b, "--out", out)
    assert localized.exit_code == 0, localized.output
    heatmaps = sorted(p.name for p in out.rglob("*_heatmap.png"))
    tiffs = sorted(out.rglob("*.tiff"))
    assert len(heatmaps) == 2 and len(set(heatmaps)) == 2 and len(tiffs) == 2, heatmaps
    assert not np.array_equal(np.asarray(Image.open(tiffs[0])), np.asarray(Image.open(tiffs[1])))


def test_outputs_cannot_escape_the_output_folder(invoke, bundle, good, tmp_path):
    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    shutil.copy(good, inputs / "sub" / "img.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(outside)  # mirroring inputs/sub/ would land outside
    dotted = f"{inputs}/sub/../../ok/good.png"  # '..' in an input path
    result = invoke("localize", bundle, inputs, dotted, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert list(outside.iterdir()) == []
    real_out = os.path.realpath(out)
    written = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(written) == 2 * 5 + 1  # 5 products per image + index.html
    for path in written:
        assert os.path.commonpath([os.path.realpath(path), real_out]) == real_out, path
    assert (out / "good_heatmap.png").is_file()
    masks = invoke("export-masks", bundle, inputs, "--out", out, "--overwrite")
    assert masks.exit_code == 0 and list(outside.iterdir()) == []


# -------------------------------------------------------------------------------- bundles


@pytest.mark.parametrize("name", ["denoiser.safetensors", "calibration.json", "checksums.json"])
def test_bundle_missing_file(invoke, bundle_copy, good, name):
    (bundle_copy / name).unlink()
    result = invoke("score", bundle_copy, good)
    assert_usage_error(result, str(bundle_copy), name, "missing")


def test_bundle_missing_config(invoke, bundle_copy, good):
    (bundle_copy / "config.json").unlink()
    assert_usage_error(invoke("score", bundle_copy, good), str(bundle_copy), "not a decodiff bundle")


def test_bundle_truncated_safetensors(invoke, bundle_copy, good):
    weights = bundle_copy / "denoiser.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_usage_error(invoke("score", bundle_copy, good), "denoiser.safetensors", "checksum")
    rewrite_checksum(bundle_copy, "denoiser.safetensors")  # a consistent but broken copy
    assert_usage_error(invoke("score", bundle_copy, good), "denoiser.safetensors", "not a readable safetensors file")


def test_bundle_altered_weights(invoke, bundle_copy, good):
    weights = bundle_copy / "denoiser.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one weight changed: still a valid file
    weights.write_bytes(bytes(data))
    assert_usage_error(invoke("score", bundle_copy, good), "denoiser.safetensors", "altered or corrupted")
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state.pop(sorted(state)[0])  # weights of another architecture
    save_file(state, str(weights))
    rewrite_checksum(bundle_copy, "denoiser.safetensors")
    assert_usage_error(invoke("score", bundle_copy, good), "denoiser.safetensors", "do not match the architecture")


def test_bundle_json_with_unknown_key(invoke, bundle_copy, good):
    config = json.loads((bundle_copy / "config.json").read_text())
    config["preprocess"]["sharpen"] = True
    (bundle_copy / "config.json").write_text(json.dumps(config))
    assert_usage_error(invoke("score", bundle_copy, good), "config.json", "checksum")
    rewrite_checksum(bundle_copy, "config.json")
    assert_usage_error(invoke("score", bundle_copy, good), "config.json", "unknown keys sharpen")


def test_bundle_json_with_wrong_type(invoke, bundle_copy, good):
    config = json.loads((bundle_copy / "config.json").read_text())
    config["preprocess"]["image_size"] = "64"
    (bundle_copy / "config.json").write_text(json.dumps(config))
    rewrite_checksum(bundle_copy, "config.json")
    assert_usage_error(invoke("score", bundle_copy, good), "config.json")


def test_bundle_from_the_future(invoke, bundle_copy, good):
    config = json.loads((bundle_copy / "config.json").read_text())
    config["format_version"] = 99
    (bundle_copy / "config.json").write_text(json.dumps(config))
    rewrite_checksum(bundle_copy, "config.json")
    assert_usage_error(invoke("score", bundle_copy, good), "config.json", "format version 99", "upgrade decodiff")
    assert_usage_error(invoke("info", bundle_copy), "format version 99")


def test_bundle_given_to_fit_as_data(invoke, bundle, tmp_path):
    result = invoke("fit", bundle, "--out", tmp_path / "m", *TINY_FIT)
    assert_usage_error(result, str(bundle), "is a decodiff bundle")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.work").exists()


def test_dataset_given_as_bundle(invoke, category_dir, good):
    for command in ("score", "localize"):
        args = ("--out", str(good.parent.parent / "o")) if command == "localize" else ()
        result = invoke(command, category_dir, good, *args)
        assert_usage_error(result, str(category_dir), "not a decodiff bundle")
    assert_usage_error(invoke("info", category_dir), "not a decodiff bundle")


# ------------------------------------------------------------------------ extreme pictures


def test_constant_images_give_finite_scores(invoke, score, bundle, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for name, value in (("black", 0), ("white", 255), ("grey", 128)):
        Image.new("RGB", (64, 64), (value,) * 3).save(folder / f"{name}.png")
    result, records = score(folder)
    assert_scored(result, records, *(folder / f"{n}.png" for n in ("black", "white", "grey")))
    assert all(math.isfinite(r["normalized_score"]) for r in records.values())
    out = tmp_path / "maps"
    localized = invoke("localize", bundle, folder, "--out", out)
    assert localized.exit_code == 0, localized.output
    tiffs = sorted(out.rglob("*.tiff"))
    assert len(tiffs) == 3, tiffs  # one map per image, or the check below checks nothing
    for tiff in tiffs:
        assert np.isfinite(np.asarray(Image.open(tiff))).all(), tiff


def test_nan_producing_model_reports_the_image_as_failed(bundle, good, monkeypatch):
    """A model that produces NaN (e.g. overflow in reduced precision) must never yield a
    NaN score that would compare as 'normal': the image is reported as failed."""
    from decodiff_cli.detector import Detector

    detector = Detector.load(bundle, device="cpu")
    monkeypatch.setattr(detector.model.denoiser, "forward", lambda z, t, labels=None: torch.full_like(z, float("nan")))
    (result,) = list(detector.predict([str(good)]))
    assert result.error is not None and "non-finite" in result.error and good.name in result.error
    assert not result.is_anomalous and result.anomaly_map is None


# --------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_two_concurrent_runs_share_one_log(bundle, category_dir, test_images, tmp_path):
    log = tmp_path / "same.jsonl"
    args = ("score", bundle, category_dir / "test", "--output", log, "--skip-existing")
    procs = [decodiff_process(*args) for _ in range(2)]
    outcomes = [p.communicate(timeout=240) for p in procs]
    for proc, (_, err) in zip(procs, outcomes):
        assert proc.returncode == 0, err.decode(errors="replace")
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a newline: no torn last record
    records = [json.loads(line) for line in lines[:-1]]  # every line parses
    assert all(line.strip() for line in lines[:-1])
    paths = [r["path"] for r in records]
    assert set(paths) == set(map(str, test_images))  # each image at least once
    assert len(paths) <= 2 * len(test_images)
    assert all(r["error"] is None for r in records)


# ---------------------------------------------------------------------------- benchmark


def test_benchmark_with_only_good_images(invoke, good_images, tmp_path):
    root = tmp_path / "goodonly"
    maps = tmp_path / "maps"
    for image in good_images:
        target = root / CATEGORY / "test" / "good" / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
        (maps / CATEGORY / "test" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(0).random((64, 64), dtype=np.float32)).save(
            maps / CATEGORY / "test" / "good" / f"{image.stem}.tiff")
    report = tmp_path / "r.json"
    result = invoke("benchmark", root, "--maps", maps, "--json", report, "--plots", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    data = json.loads(report.read_text())
    assert all(v is None for v in data["categories"][CATEGORY].values())
    assert all(v is None for v in data["mean"].values())
    assert any("undefined: none of the" in note and "anomalous" in note for note in data["notes"])
    assert "n/a" in result.stdout
    assert "undefined" in result.stderr


def test_benchmark_stops_at_an_unreadable_file_naming_it(invoke, bundle, category_dir, tmp_path):
    """Its metrics need every test image: one error line naming the file, exit 2."""
    root, maps = tmp_path / "mvtec", tmp_path / "maps"
    shutil.copytree(category_dir / "test", root / CATEGORY / "test")
    shutil.copytree(category_dir / "ground_truth", root / CATEGORY / "ground_truth")
    for image in (root / CATEGORY / "test").rglob("*.png"):
        target = maps / CATEGORY / "test" / image.parent.name / f"{image.stem}.tiff"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(0).random((64, 64), dtype=np.float32)).save(target)
    bad = root / CATEGORY / "test" / "good" / "cut_header.jpg"
    bad.write_bytes(JPEG_CUT_IN_ITS_HEADER)
    (maps / CATEGORY / "test" / "good" / "cut_header.tiff").write_bytes(b"II*\0")  # a map cut short
    assert_usage_error(invoke("benchmark", root, "--bundle", bundle), "cut_header.jpg", "Truncated File Read")
    assert_usage_error(invoke("benchmark", root, "--maps", maps, "--protocol", "native"),
                       "cannot read image", "cut_header.jpg", "truncated or corrupt")
    assert_usage_error(invoke("benchmark", root, "--maps", maps), "cannot read anomaly map", "cut_header.tiff")
    bad.unlink()
    mask = sorted((root / CATEGORY / "ground_truth").rglob("*.png"))[0]
    mask.write_bytes(mask.read_bytes()[:60])
    for protocol in ("paper", "native"):
        assert_usage_error(invoke("benchmark", root, "--maps", maps, "--protocol", protocol),
                           "cannot read mask", mask.name, "truncated or corrupt")


# ----------------------------------------------------------------------- interrupted fit


@pytest.mark.slow
def test_sigterm_during_fit_then_resume(invoke, category_dir, tmp_path):
    out = tmp_path / "model"
    work = tmp_path / "model.work"
    proc = decodiff_process("fit", category_dir, "--out", out, *TINY_FIT, "--max-steps", "100000")
    try:
        deadline = time.monotonic() + 180
        while not (work / "training_log.jsonl").is_file():  # written at step 1: training runs
            assert proc.poll() is None, proc.communicate()[1].decode(errors="replace")
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    message = err.decode(errors="replace")
    assert proc.returncode == 130, message
    assert "interrupted at step" in message and "--resume" in message
    assert "Traceback" not in message
    assert not out.exists()
    state = json.loads((work / "checkpoint" / "trainer_state.json").read_text())
    step = state["step"]
    assert step >= 1

    # The options are not stored with the checkpoint: they must be given again. A model
    # option left out is refused in one line (not a page of tensor size mismatches) ...
    forgot = invoke("fit", category_dir, "--out", out, "--autoencoder", "pixel", "--image-size", "64",
                    "--batch-size", "4", "--resume")
    assert_usage_error(forgot, "cannot resume", "denoiser.size 'tiny' -> 'xs'")
    assert (work / "checkpoint" / "trainer_state.json").is_file()

    # ... while max_steps is taken from the resumed command line (the checkpoint holds the step,
    # optimiser and schedule, not the options): a smaller --max-steps ends the run early.
    target = step + 2
    resumed = invoke("fit", category_dir, "--out", out, *TINY_FIT, "--max-steps", str(target), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "denoiser.safetensors").is_file() and not work.exists()
    assert f"trained {target} steps" in resumed.stderr
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == target
    again = invoke("fit", category_dir, "--out", out, *TINY_FIT, "--resume")
    assert_usage_error(again, "nothing to resume")
