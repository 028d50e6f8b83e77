"""Issue 17: no damaged file stops a batch. Seeded, deterministic variants of PNG, JPEG
(baseline and progressive), TIFF (8-bit, 16-bit, float), WebP (lossy, lossless), BMP and
GIF: cut at the edges and middle of every segment (headers included), headers alone,
bytes flipped, wrong extensions. Scored in one batch with the valid originals, through
the library and the CLI: every valid image is scored, every other file gives exactly one
record (a score or an error naming it), nothing raises, nothing hangs.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from decodiff_cli.images import ImageReadError, read_image

SEED = 17


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def originals() -> dict[str, tuple[str, bytes]]:
    """name -> (extension, bytes) of small valid files, one per kind."""
    rng = np.random.default_rng(SEED)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 65536, (20, 24)).astype(np.uint16))
    real = Image.fromarray(rng.random((20, 24)).astype(np.float32))
    return {
        "png": (".png", _encode(rgb, "PNG")),
        "jpeg": (".jpg", _encode(rgb, "JPEG", quality=90)),
        "progressive": (".jpg", _encode(rgb, "JPEG", quality=90, progressive=True)),
        "tiff8": (".tif", _encode(rgb, "TIFF")),
        "tiff16": (".tiff", _encode(wide, "TIFF")),
        "tifffloat": (".tiff", _encode(real, "TIFF")),
        "webp": (".webp", _encode(rgb, "WEBP", quality=80)),
        "webplossless": (".webp", _encode(rgb, "WEBP", lossless=True)),
        "bmp": (".bmp", _encode(rgb, "BMP")),
        "gif": (".gif", _encode(rgb, "GIF")),
    }


# ------------------------------------------------------------- each format's segments
# (start, end, pixels): header segments have pixels False; a cut before the first pixel
# byte leaves nothing to decode, so such a file must fail.


def _png(d: bytes):
    out, pos = [(0, 8, False)], 8
    while pos + 8 <= len(d):
        size, kind = struct.unpack(">I4s", d[pos:pos + 8])
        out.append((pos, pos + 12 + size, kind in (b"IDAT", b"IEND")))
        pos += 12 + size
    return out


def _jpeg(d: bytes):
    out, pos, scanned = [(0, 2, False)], 2, False
    while pos + 2 <= len(d) and d[pos] == 0xFF:
        marker = d[pos + 1]
        if marker == 0xD9:  # EOI
            out.append((pos, pos + 2, True))
            break
        end = pos + 2 + struct.unpack(">H", d[pos + 2:pos + 4])[0]
        out.append((pos, end, scanned))
        pos = end
        if marker == 0xDA:  # SOS: entropy-coded data up to the next real marker
            scanned = True
            while not (d[pos] == 0xFF and d[pos + 1] != 0 and not 0xD0 <= d[pos + 1] <= 0xD7):
                pos += 1
            out.append((end, pos, True))
    return out


def _sub_blocks(d: bytes, pos: int) -> int:
    while d[pos]:
        pos += d[pos] + 1
    return pos + 1


def _gif(d: bytes):
    out, pos = [(0, 6, False), (6, 13, False)], 13
    if d[10] & 0x80:  # global colour table
        pos += 3 << ((d[10] & 7) + 1)
        out.append((13, pos, False))
    while pos < len(d):
        if d[pos] == 0x21:  # extension: introducer, label, sub-blocks
            end = _sub_blocks(d, pos + 2)
            out.append((pos, end, False))
        elif d[pos] == 0x2C:  # image descriptor, local colour table, LZW code size, data
            end = pos + 10 + (3 << ((d[pos + 9] & 7) + 1) if d[pos + 9] & 0x80 else 0) + 1
            out.append((pos, end, False))
            pos, end = end, _sub_blocks(d, end)
            out.append((pos, end, True))
        else:  # trailer
            out.append((pos, pos + 1, True))
            break
        pos = end
    return out


def _webp(d: bytes):
    out, pos = [(0, 12, False)], 12
    while pos + 8 <= len(d):
        kind, size = struct.unpack("<4sI", d[pos:pos + 8])
        frame_header = {b"VP8 ": 10, b"VP8L": 5}.get(kind, size)  # the bitstream's own header
        out += [(pos, pos + 8, False), (pos + 8, pos + 8 + frame_header, False)]
        if frame_header < size:
            out.append((pos + 8 + frame_header, pos + 8 + size, True))
        pos += 8 + size + (size & 1)
    return out


def _bmp(d: bytes):
    pixels, dib = struct.unpack("<I", d[10:14])[0], struct.unpack("<I", d[14:18])[0]
    out = [(0, 14, False), (14, 14 + dib, False)]
    if 14 + dib < pixels:
        out.append((14 + dib, pixels, False))
    return out + [(pixels, len(d), True)]


_TIFF_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8}


def _tiff(d: bytes):
    assert d[:2] == b"II"
    ifd = struct.unpack("<I", d[4:8])[0]
    count = struct.unpack("<H", d[ifd:ifd + 2])[0]
    out = [(0, 8, False), (ifd, ifd + 2, False), (ifd + 2 + 12 * count, ifd + 6 + 12 * count, False)]
    strips = {}
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag, kind, n = struct.unpack("<HHI", d[at:at + 8])
        out.append((at, at + 12, False))
        size = _TIFF_SIZES.get(kind, 1) * n
        values_at = at + 8 if size <= 4 else struct.unpack("<I", d[at + 8:at + 12])[0]
        if size > 4:
            out.append((values_at, values_at + size, False))
        if tag in (273, 279):  # StripOffsets, StripByteCounts
            fmt = "<" + ("H" if kind == 3 else "I") * n
            strips[tag] = struct.unpack(fmt, d[values_at:values_at + struct.calcsize(fmt)])
    out += [(a, a + n, True) for a, n in zip(strips[273], strips[279])]
    return out


SEGMENTS = {"png": _png, "jpeg": _jpeg, "progressive": _jpeg, "tiff8": _tiff, "tiff16": _tiff,
            "tifffloat": _tiff, "webp": _webp, "webplossless": _webp, "bmp": _bmp, "gif": _gif}


def first_pixel_byte(kind: str, data: bytes) -> int:
    return min(start for start, _, pixels in SEGMENTS[kind](data) if pixels)


def damaged(kind: str, data: bytes, rng: np.random.Generator):
    """(label, bytes, must_fail) variants of one valid file."""
    segments = SEGMENTS[kind](data)
    assert max(end for _, end, _ in segments) == len(data), kind  # the parser saw the whole file
    pixels_from = first_pixel_byte(kind, data)
    cuts = {len(data) * k // 8 for k in range(1, 8)}
    for start, end, _ in segments:
        cuts |= {start, start + 1, (start + end) // 2, end - 1}
    for cut in sorted(c for c in cuts if 0 < c < len(data)):
        yield f"cut{cut}", data[:cut], cut <= pixels_from
    yield "headers", data[:pixels_from], True
    for i in range(8):  # 1-3 bytes flipped, half of the variants within the headers
        flipped = bytearray(data)
        for at in rng.integers(0, pixels_from if i % 2 else len(data), rng.integers(1, 4)):
            flipped[at] ^= int(rng.integers(1, 256))
        yield f"flip{i}", bytes(flipped), False


def build_corpus(folder: Path) -> tuple[list[Path], dict[Path, bool]]:
    """Writes the files; returns (valid files, {damaged file: must fail})."""
    rng = np.random.default_rng(SEED)
    kinds = originals()
    extensions = [ext for ext, _ in kinds.values()]
    valid, broken = [], {}
    for i, (kind, (ext, data)) in enumerate(kinds.items()):
        path = folder / f"{kind}_valid{ext}"
        path.write_bytes(data)
        other = folder / f"{kind}_valid_named{extensions[(i + 3) % len(extensions)]}"  # wrong extension
        other.write_bytes(data)
        valid += [path, other]
        for label, variant, must_fail in damaged(kind, data, rng):
            wrong = label.endswith("1")  # every tenth or so under another format's extension
            path = folder / f"{kind}_{label}{extensions[(i + 5) % len(extensions)] if wrong else ext}"
            path.write_bytes(variant)
            broken[path] = must_fail
    return valid, broken


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    valid, broken = build_corpus(folder)
    return folder, valid, broken


def test_the_corpus_covers_every_kind_and_header(corpus):
    folder, valid, broken = corpus
    assert len(broken) >= 400 and len(valid) == 2 * len(originals())
    for kind in originals():
        assert sum(p.name.startswith(kind + "_") for p in broken) >= 20, kind
    assert sum(broken.values()) >= 150  # cut before any pixel data


def _run_with_limit(fn, seconds: float):
    """fn() in a thread; fail instead of hanging the suite when it does not return."""
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"did not finish within {seconds} s"
    assert outcome, "raised (see the thread's traceback above)"
    return outcome[0]


@pytest.mark.slow
def test_damaged_files_never_stop_a_batch(bundle, corpus):
    from decodiff_cli.detector import Detector

    folder, valid, broken = corpus
    detector = Detector.load(bundle, device="cpu", batch_size=16)
    paths = sorted(valid + list(broken))
    results = _run_with_limit(lambda: list(detector.predict([str(p) for p in paths])), 120)
    assert [r.path for r in results] == [str(p) for p in paths]  # one result each, in order
    failed = set()
    for path, r in zip(paths, results):
        if r.error is None:
            assert math.isfinite(r.score) and r.anomaly_map is not None, path
        else:
            assert path.name in r.error and r.error.startswith("cannot read image"), r.error
            failed.add(path)
    assert not failed & set(valid), sorted(failed & set(valid))
    must_fail = {p for p, needed in broken.items() if needed}
    assert must_fail <= failed, sorted(p.name for p in must_fail - failed)


@pytest.mark.slow
def test_damaged_files_through_the_cli(invoke, bundle, corpus):
    folder, valid, broken = corpus
    result = _run_with_limit(lambda: invoke("score", bundle, folder, "--format", "jsonl"), 120)
    assert result.exit_code == 3, result.output[-2000:]
    assert "Traceback" not in result.output
    records = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(records) == {p.name for p in valid + list(broken)}
    for path in valid:
        assert records[path.name]["error"] is None and math.isfinite(records[path.name]["score"])
    failed = [name for name, r in records.items() if r["error"] is not None]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == len(failed) and all(r["score"] is None for n, r in records.items() if n in failed)


# ------------------------------------------------------------- and where hypothesis looks

_KINDS = originals()
_SCRATCH = Path(tempfile.mkdtemp(prefix="decodiff-fuzz-"))


@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(_KINDS)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4))
def test_read_image_gives_an_image_or_one_clear_error(kind, cut, flips):
    ext, data = _KINDS[kind]
    variant = bytearray(data[:max(1, round(cut * len(data)))])
    for where, mask in flips:
        variant[min(int(where * len(variant)), len(variant) - 1)] ^= mask
    path = _SCRATCH / f"{kind}{ext}"
    path.write_bytes(bytes(variant))
    try:
        img = read_image(path)
    except ImageReadError as err:
        assert path.name in str(err)
    else:
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


def teardown_module():
    for path in _SCRATCH.iterdir():
        path.unlink()
    os.rmdir(_SCRATCH)
