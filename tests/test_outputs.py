"""Tests for the result-file modules (files, output_paths, render, gallery, records): result
files that must survive unattended runs."""

from __future__ import annotations

import csv
import errno
import io
import json
import multiprocessing
import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from decodiff_cli import files, output_paths, records
from decodiff_cli.files import atomic_write_bytes, atomic_write_text, atomic_writer
from decodiff_cli.gallery import GalleryEntry, write_gallery
from decodiff_cli.output_paths import OutputPaths
from decodiff_cli.records import Record, RecordWriter, read_scored_paths
from decodiff_cli.render import (
    binary_mask,
    heatmap_image,
    overlay_image,
    read_float_tiff,
    save_float_tiff,
    save_image,
)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_keeps_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~files._UMASK  # not mkstemp's 0600
    assert _leftovers(target.parent) == []


def test_atomic_write_failure_mid_write_keeps_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_writer(target) as f:
            f.write(b"half of the new cont")
            raise OSError(errno.ENOSPC, "No space left on device")  # simulated disk full
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_in_fsync_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ output paths


def _all_products(pp) -> list[Path]:
    return [getattr(pp, k) for k in output_paths.PRODUCTS]


def _inside(path: Path, folder: Path) -> bool:
    real, top = os.path.realpath(path.parent), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top


def test_paths_mirror_relative_layout(tmp_path):
    root = tmp_path / "in"
    out = tmp_path / "out"
    pp = OutputPaths(out, [(root / "a" / "b" / "x.png", root)])[root / "a" / "b" / "x.png"]
    assert pp.anomaly_map == Path(os.path.realpath(out)) / "a" / "b" / "x.tiff"
    assert pp.heatmap.name == "x_heatmap.png"


def test_paths_never_escape_output_folder(tmp_path):
    root, out, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(outside)  # a link in the output folder pointing out of it
    inputs = [
        (str(root) + "/../escape.png", root),  # '..' leaves the root: only the name is kept
        ("/etc/passwd", None),  # absolute single file
        (root / "sub" / "x.png", root),  # mirrors to out/sub/... which is the symlink
    ]
    paths = OutputPaths(out, inputs)
    for path, _ in inputs:
        for product in _all_products(paths[path]):
            assert _inside(product, out), product
    assert paths[root / "sub" / "x.png"].anomaly_map.name == "sub__x.tiff"


def test_paths_disambiguate_collisions_deterministically(tmp_path):
    out = tmp_path / "out"
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    first = OutputPaths(out, [(a, None), (b, None)])
    second = OutputPaths(out, [(b, None), (a, None), (a, None)])  # order and duplicates
    assert first[a].anomaly_map != first[b].anomaly_map
    assert first[a] == second[a] and first[b] == second[b]
    assert re.fullmatch(r"x-[0-9a-f]{8}\.tiff", first[a].anomaly_map.name)
    # An object with .path/.root (like inputs.InputImage) works as well as a pair.
    alone = OutputPaths(out, [SimpleNamespace(path=a, root=None)])  # no clash, no suffix
    assert alone[a].anomaly_map.name == "x.tiff"


def test_paths_never_overwrite_an_input(tmp_path):
    inp = tmp_path / "x.tiff"
    inp.write_bytes(b"input")
    pp = OutputPaths(tmp_path, [(inp, None)])[inp]  # output folder == input folder
    assert all(os.path.realpath(p) != os.path.realpath(inp) for p in _all_products(pp))


def test_paths_handle_undecodable_and_spaced_names(tmp_path):
    name = os.fsdecode(b"caf\xe9 shot 1.png")  # Latin-1 byte: a lone surrogate in str
    inp = tmp_path / "in" / name
    pp = OutputPaths(tmp_path / "out", [(inp, tmp_path / "in")])[inp]
    save_float_tiff(pp.anomaly_map, np.zeros((2, 2), np.float32))
    assert os.fsencode(pp.anomaly_map.name) == b"caf\xe9 shot 1.tiff"
    assert pp.anomaly_map.exists()


@pytest.mark.parametrize("root", [None, "data", "data/bottle"])
def test_paths_follow_mvtec_layout(tmp_path, root):
    inp = tmp_path / "data" / "bottle" / "test" / "broken_large" / "000.png"
    (tmp_path / "data" / "bottle" / "ground_truth").mkdir(parents=True)
    out = tmp_path / "maps"
    pp = OutputPaths(out, [(inp, None if root is None else tmp_path / root)])[inp]
    expected = Path(os.path.realpath(out)) / "bottle" / "test" / "broken_large" / "000.tiff"
    assert pp.anomaly_map == expected


def test_paths_do_not_take_any_test_folder_for_mvtec(tmp_path):
    inp = tmp_path / "mine" / "test" / "ok" / "1.png"  # no train/ or ground_truth/ next to it
    pp = OutputPaths(tmp_path / "out", [(inp, tmp_path / "mine")])[inp]
    assert pp.anomaly_map == Path(os.path.realpath(tmp_path / "out")) / "test" / "ok" / "1.tiff"


# ---------------------------------------------------------------------------- image products


def test_float_tiff_round_trip_is_exact(tmp_path):
    amap = np.random.default_rng(0).normal(size=(37, 53)).astype(np.float32)  # not only [0,1]
    save_float_tiff(tmp_path / "m.tiff", amap)
    back = read_float_tiff(tmp_path / "m.tiff")
    assert back.dtype == np.float32 and np.array_equal(back, amap)
    with Image.open(tmp_path / "m.tiff") as im:
        assert im.mode == "F"


def test_heatmap_and_overlay_at_original_resolution(tmp_path):
    amap = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    amap[0, 0] = np.nan
    heat = heatmap_image(amap)
    assert heat.size == (64, 64) and heat.mode == "RGB"
    lum = np.asarray(heatmap_image(np.linspace(0, 1, 256)[None]), float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lum[0]) > -1.5)  # perceptually ordered: brightness rises with score
    original = np.full((120, 90, 3), 128, np.uint8)
    over = overlay_image(original, amap, alpha=0.4)
    assert over.size == (90, 120)
    save_image(tmp_path / "o.png", over)
    with Image.open(tmp_path / "o.png") as im:
        assert im.format == "PNG" and im.size == (90, 120)


def test_mask_min_area_drops_specks_keeps_blobs():
    amap = np.zeros((20, 20), np.float32)
    amap[2, 2] = 0.9  # 1-pixel speck
    amap[15, 3] = amap[16, 4] = 0.9  # 2 pixels touching diagonally: one 8-connected speck
    amap[8:13, 8:13] = 0.9  # 25-pixel blob
    raw = binary_mask(amap, 0.5)
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255} and (raw > 0).sum() == 28
    cleaned = binary_mask(amap, 0.5, min_area=3)
    assert (cleaned > 0).sum() == 25 and cleaned[10, 10] == 255 and cleaned[2, 2] == 0
    assert (binary_mask(amap, 0.5, min_area=2) > 0).sum() == 27  # diagonal pair kept


# --------------------------------------------------------------------------------- gallery


def test_gallery_escapes_links_relatively_and_sorts(tmp_path):
    out = tmp_path / "out"
    (out / "imgs").mkdir(parents=True)
    entries = [
        GalleryEntry("low.png", 0.1, 0.5, False, heatmap=out / "imgs" / "low heat.png"),
        {"name": "<script>alert(1)</script>.png", "score": 0.9, "threshold": 0.5,
         "is_anomalous": True, "overlay": "imgs/o.png", "class": "bottle"},
        GalleryEntry("mid.png", 0.5, 0.5, False, reconstruction=tmp_path / "elsewhere.png"),
        GalleryEntry("broken.png", error="cannot identify image file <broken.png>"),
    ]
    page = write_gallery(out, entries).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;broken.png&gt;" in page and "4 images, 1 anomalous, 1 failed" in page
    links = re.findall(r'(?:href|src)="([^"]*)"', page)
    assert links and all(not l.startswith(("/", "http", "..")) and ":" not in l for l in links)
    assert "imgs/low%20heat.png" in links
    assert "elsewhere" not in page  # outside the gallery folder: no link at all
    order = [page.index(n) for n in ("&lt;script&gt;", "mid.png", "low.png")]
    assert order == sorted(order)


# ------------------------------------------------------------------------------ score records


def test_records_are_finite_json_and_csv_to_streams():
    rec = Record("a b.png", "bottle", float("nan"), 0.5, float("inf"), True, None)
    buf = io.StringIO()
    RecordWriter(buf, "jsonl").write(rec)
    d = json.loads(buf.getvalue(), parse_constant=lambda c: pytest.fail(f"non-finite {c}"))
    assert d == {"path": "a b.png", "class": "bottle", "score": None, "threshold": 0.5,
                 "normalized_score": None, "is_anomalous": True, "error": None}
    buf = io.StringIO()
    RecordWriter(buf, "csv").write(Record("x,y.png", score=0.25, error="bad\nfile"))
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert rows[0] == list(records.RECORD_FIELDS)
    assert rows[1] == ["x,y.png", "", "0.25", "", "", "", "bad file"]


def _append_records(path: str, fmt: str, tag: str, n: int) -> None:
    with RecordWriter(path, fmt) as w:
        for i in range(n):
            w.write(Record(f"{tag}/img_{i:04d}.png", "cls", i / n, 0.5, None, i % 2 == 0, None))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_concurrent_appends_from_two_processes(tmp_path, fmt):
    path, n = str(tmp_path / f"scores.{fmt}"), 300
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_records, args=(path, fmt, t, n)) for t in ("p", "q")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = Path(path).read_text().splitlines()
    if fmt == "jsonl":
        paths = [json.loads(line)["path"] for line in lines]
    else:
        rows = list(csv.DictReader(lines))
        assert lines.count(",".join(records.RECORD_FIELDS)) == 1  # header written once
        assert all(None not in r and r["class"] == "cls" for r in rows)
        paths = [r["path"] for r in rows]
    expected = {f"{t}/img_{i:04d}.png" for t in ("p", "q") for i in range(n)}
    assert len(paths) == 2 * n and set(paths) == expected
    assert read_scored_paths(path) == expected


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_skip_existing_tolerates_torn_lines(tmp_path, fmt):
    path = tmp_path / f"scores.{fmt}"
    with RecordWriter(path, fmt, durable=False) as w:
        w.write(Record("a.png", score=0.1))
        w.write(Record("b.png", score=0.2))
        w.write(Record("failed.png", error="boom"))  # failures are retried, not skipped
    with open(path, "ab") as f:  # a run killed mid-record
        f.write(b'{"path": "torn.png", "sco' if fmt == "jsonl" else b'"torn\n.png",,0.3')
    assert read_scored_paths(path) == {"a.png", "b.png"}
    assert read_scored_paths(path, include_failed=True) == {"a.png", "b.png", "failed.png"}
    with RecordWriter(path, fmt, durable=False) as w:  # resuming appends after the torn line
        w.write(Record(os.fsdecode(b"c\xff.png"), score=0.3))
    assert read_scored_paths(path) == {"a.png", "b.png", os.fsdecode(b"c\xff.png")}
    assert read_scored_paths(tmp_path / "missing.jsonl") == set()
