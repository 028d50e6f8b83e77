"""Everything that writes result files: atomic writes, output paths, images, gallery, records.

Runs are unattended (cron, pipelines), so every writer here must survive being killed or
running out of disk half-way: a file is either its old self or its complete new self, never
a torn mix, and a score log can always be parsed and resumed with ``--skip-existing``.
No printing and no CLI code here; the commands call these functions.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import html
import io
import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator
from urllib.parse import quote

import numpy as np
from PIL import Image
from scipy import ndimage

from decodiff_cli.datasets import is_mvtec_test_image

PathLike = str | os.PathLike

# Read once: mkstemp creates files 0600, we want what a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)

# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: str = "wb", **open_kw: Any) -> Iterator[IO]:
    """Yield a temp file next to ``path``; on clean exit fsync it and rename it over ``path``.

    The temp file lives in the same folder so ``os.replace`` is a rename within one file
    system, which is atomic. On any error (disk full, a bug in the writer, Ctrl-C) the old
    file is left untouched and the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fixed short prefix, not path.name: a long input name plus a prefix could pass NAME_MAX.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".decodiff-", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself survive a power cut


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: not every file system allows it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_writer(path, "w", encoding=encoding, newline="") as f:
        f.write(text)


# ------------------------------------------------------------------------------ output paths

# Suffix per product. None is a suffix of another, so two stems give the same file only if
# they are equal: collisions between products reduce to collisions between stems.
PRODUCTS = {
    "anomaly_map": ".tiff",  # raw float map, the file MVTec's evaluation reads
    "heatmap": "_heatmap.png",
    "overlay": "_overlay.png",
    "mask": "_mask.png",
    "reconstruction": "_recon.png",
}


@dataclass(frozen=True)
class ProductPaths:
    """Where one input's results go."""

    stem: Path
    anomaly_map: Path
    heatmap: Path
    overlay: Path
    mask: Path
    reconstruction: Path

    @classmethod
    def from_stem(cls, stem: Path) -> ProductPaths:
        return cls(stem, **{k: stem.with_name(stem.name + s) for k, s in PRODUCTS.items()})


def _is_within(child: str, parent: str) -> bool:
    return os.path.commonpath([child, parent]) == parent


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(os.fsencode(text)).hexdigest()[:n]


def _fit(name: str, limit: int = 200) -> str:
    """Keep a name under NAME_MAX (255 bytes) once a hash and a product suffix are added."""
    raw = os.fsencode(name)
    return name if len(raw) <= limit else os.fsdecode(raw[: limit - 9]) + "-" + _short_hash(name)


def relative_stem(path: PathLike, root: PathLike | None = None) -> tuple[str, ...]:
    """Folders and file stem an input's outputs are named after, before disambiguation.

    MVTec AD layout (``<category>/test/<defect>/<id>.<ext>``) wins so that the raw maps land
    where MVTec's official evaluation looks; otherwise the path relative to the folder the
    user gave is mirrored; otherwise (single file, glob, outside its root) only the name.
    """
    if os.fspath(path) == "-":
        return ("stdin",)
    p = os.path.abspath(path)  # lexical: removes '..' and makes relative paths absolute
    parts = Path(p).parts[1:]
    rel: tuple[str, ...] = parts[-1:]
    if is_mvtec_test_image(p):
        rel = parts[-4:]
    elif root is not None and _is_within(p, os.path.abspath(root)) and p != os.path.abspath(root):
        rel = Path(p).relative_to(os.path.abspath(root)).parts
    clean = [_fit(x) for x in rel if x not in ("", ".", "..")]
    *folders, name = clean or ["unnamed"]
    return (*folders, _fit(Path(name).stem or name))


class OutputPaths:
    """Maps every input to its :class:`ProductPaths` under one output folder.

    Built once from all inputs, so a name never depends on the order images are processed
    in. Inputs are ``(path, root)`` pairs; ``root`` is the folder the user gave, or None.
    """

    def __init__(self, out_dir: PathLike, inputs: Iterable[Any]):
        self.out_dir = os.path.realpath(out_dir)
        stems: dict[str, tuple[str, ...]] = {}
        for item in inputs:  # (path, root) pairs, or objects with .path/.root (InputImage)
            path, root = (item.path, item.root) if hasattr(item, "path") else item
            stems.setdefault(os.path.abspath(path), self._contained(relative_stem(path, root)))
        input_files = {os.path.realpath(p) for p in stems}
        # Case-folded so that names differing only in case do not clash on macOS/Windows disks.
        groups: dict[tuple[str, ...], int] = defaultdict(int)
        for parts in stems.values():
            groups[_fold(parts)] += 1
        self._map: dict[str, ProductPaths] = {}
        for key, parts in stems.items():
            if groups[_fold(parts)] > 1 or self._hits_input(parts, input_files):
                # Suffix from the input's own absolute path: the same input always gets the
                # same name, whatever else is in the run and in whatever order.
                parts = (*parts[:-1], f"{parts[-1]}-{_short_hash(key)}")
            self._map[key] = ProductPaths.from_stem(Path(self.out_dir, *parts))
        if len({_fold(p.stem.parts) for p in self._map.values()}) < len(self._map):
            raise RuntimeError("output names still collide after disambiguation")

    def __getitem__(self, path: PathLike) -> ProductPaths:
        return self._map[os.path.abspath(path)]

    def _contained(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """Keep the mirrored folders only if they stay inside the output folder once symlinks
        already there are followed; otherwise flatten them into one name at its top.
        (Links created after this check are the user's own doing; we do not fight races.)"""
        parent = os.path.realpath(os.path.join(self.out_dir, *parts[:-1]))
        return parts if _is_within(parent, self.out_dir) else (_fit("__".join(parts)),)

    def _hits_input(self, parts: tuple[str, ...], input_files: set[str]) -> bool:
        products = ProductPaths.from_stem(Path(self.out_dir, *parts))
        return any(os.path.realpath(getattr(products, k)) in input_files for k in PRODUCTS)


def _fold(parts: Iterable[str]) -> tuple[str, ...]:
    return tuple(p.casefold() for p in parts)


# ---------------------------------------------------------------------------- image products

# matplotlib's "inferno" (CC0) sampled at 33 evenly spaced points; linear interpolation
# rebuilds the 256-entry table within 2/255. Dark = normal, bright yellow = anomalous.
_INFERNO_ANCHORS = (
    "000004 040312 0b0724 150b37 210c4a 2f0a5b 3d0965 4a0c6b 57106e 64156e 71196e 7d1e6d 8a226a "
    "972766 a32c61 b0315b bc3754 c63d4d d04545 da4e3c e35933 eb6429 f1711f f67e14 f98c0a fb9b06 "
    "fcaa0f fbba1f f9c932 f5d949 f2e865 f3f586 fcffa4"
)


def _build_lut(anchors: str) -> np.ndarray:
    rgb = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in anchors.split()], float)
    x, xp = np.linspace(0, 1, 256), np.linspace(0, 1, len(rgb))
    return np.stack([np.interp(x, xp, rgb[:, c]) for c in range(3)], 1).round().astype(np.uint8)


INFERNO = _build_lut(_INFERNO_ANCHORS)  # (256, 3) uint8


def _unit_map(amap: np.ndarray) -> np.ndarray:
    a = np.asarray(amap, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"an anomaly map must be 2-D (H, W), got shape {a.shape}")
    return np.nan_to_num(np.clip(a, 0.0, 1.0), nan=0.0)  # NaN would index the LUT at random


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size`` = (width, height), staying float32."""
    a = np.ascontiguousarray(amap, dtype=np.float32)
    if (a.shape[1], a.shape[0]) == tuple(size):
        return a
    return np.asarray(Image.fromarray(a).resize(tuple(size), Image.BILINEAR), dtype=np.float32)


def heatmap_image(amap: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """Colour a [0, 1] map with inferno; ``size`` (width, height) resizes the map first."""
    a = _unit_map(amap)
    if size is not None:
        a = _unit_map(resize_map(a, size))
    return Image.fromarray(INFERNO[np.rint(a * 255).astype(np.uint8)])


def _as_image(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))


def overlay_image(
    original: Image.Image | np.ndarray, amap: np.ndarray, alpha: float = 0.5
) -> Image.Image:
    """Heatmap blended over the original at the original's resolution (alpha = heat weight)."""
    base = _as_image(original).convert("RGB")
    return Image.blend(base, heatmap_image(amap, size=base.size), float(np.clip(alpha, 0, 1)))


def binary_mask(amap: np.ndarray, threshold: float, min_area: int = 0) -> np.ndarray:
    """uint8 mask, 255 where map >= threshold (as the detector decides); 8-connected blobs
    under ``min_area`` pixels are dropped."""
    mask = np.asarray(amap, dtype=np.float32) >= threshold  # NaN compares False: never flagged
    if min_area > 1 and mask.any():
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))  # 8-connectivity
        keep = np.bincount(labels.ravel()) >= min_area
        keep[0] = False  # label 0 is the background
        mask = keep[labels]
    return mask.astype(np.uint8) * 255


def save_image(path: PathLike, image: Image.Image | np.ndarray) -> None:
    """Save a PIL image or uint8 array atomically; the format follows the extension."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    with atomic_writer(path) as f:
        _as_image(image).save(f, format=fmt)


def save_float_tiff(path: PathLike, amap: np.ndarray) -> None:
    """Raw map as an uncompressed 32-bit float TIFF (Pillow mode 'F'); values kept exactly."""
    a = np.ascontiguousarray(amap, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"an anomaly map must be 2-D (H, W), got shape {a.shape}")
    image = Image.fromarray(a)  # float32 (H, W) -> mode 'F'
    with atomic_writer(path) as f:
        image.save(f, format="TIFF")


def read_float_tiff(path: PathLike) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float32)


# --------------------------------------------------------------------------------- gallery


@dataclass
class GalleryEntry:
    """One row of the gallery; image paths absolute or relative to the gallery folder."""

    name: str
    score: float | None = None
    threshold: float | None = None
    is_anomalous: bool | None = None
    heatmap: PathLike | None = None
    overlay: PathLike | None = None
    reconstruction: PathLike | None = None
    error: str | None = None


_CSS = (
    "body{font:14px system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse}"
    "th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:middle}"
    "img{max-width:160px;max-height:160px}.anomalous{color:#b00020;font-weight:bold}"
    ".normal{color:#1b7f3b}.failed li{color:#b00020}"
)


def _display(name: Any) -> str:
    """HTML-safe text; undecodable bytes from file names show as U+FFFD instead of crashing."""
    text = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    return html.escape(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _href(out_dir: str, target: PathLike | None) -> str | None:
    """Relative, URL-quoted link, or None for files outside the gallery folder: an absolute or
    '../' link would break as soon as the folder is copied or served elsewhere."""
    if target is None:
        return None
    rel = os.path.relpath(os.path.realpath(os.path.join(out_dir, target)), out_dir)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return html.escape(quote(os.fsencode(Path(rel).as_posix())))


def _num(x: float | None) -> str:
    return "&mdash;" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _row(out_dir: str, e: GalleryEntry) -> str:
    decision = {True: "anomalous", False: "normal"}.get(e.is_anomalous, "unknown")
    cells = [_display(e.name), _num(e.score), _num(e.threshold)]
    cells.append(f'<span class="{decision}">{decision}</span>')
    for img in (e.heatmap, e.overlay, e.reconstruction):
        h = _href(out_dir, img)
        cells.append(f'<a href="{h}"><img src="{h}" alt="" loading="lazy"></a>' if h else "&mdash;")
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _entry(e: GalleryEntry | dict) -> GalleryEntry:
    if isinstance(e, GalleryEntry):
        return e
    names = {f.name for f in dataclasses.fields(GalleryEntry)}
    return GalleryEntry(**{k: v for k, v in e.items() if k in names})  # e.g. a Record's extras


def _by_score(e: GalleryEntry) -> float:
    return -e.score if e.score is not None and math.isfinite(e.score) else math.inf


def write_gallery(out_dir: PathLike, entries: Iterable[GalleryEntry | dict]) -> Path:
    """Write ``out_dir/index.html``: a static page, rows sorted by score (highest first)."""
    items = [_entry(e) for e in entries]
    ok = sorted((e for e in items if not e.error), key=_by_score)
    failed = [e for e in items if e.error]
    n_anom = sum(bool(e.is_anomalous) for e in ok)
    folder = os.path.realpath(out_dir)  # OutputPaths hands out resolved paths too
    columns = ("image", "score", "threshold", "decision", "heatmap", "overlay", "reconstruction")
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>decodiff results</title><style>{_CSS}</style></head><body>",
        "<h1>decodiff results</h1>",
        f"<p>{len(items)} images, {n_anom} anomalous, {len(failed)} failed</p>",
        "<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr></thead><tbody>",
        *(_row(folder, e) for e in ok),
        "</tbody></table>",
    ]
    if failed:
        parts.append('<h2>Failed</h2><ul class="failed">')
        parts += [f"<li><b>{_display(e.name)}</b>: {_display(e.error)}</li>" for e in failed]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    index = Path(folder, "index.html")
    atomic_write_text(index, "\n".join(parts))
    return index


# ------------------------------------------------------------------------------ score records

RECORD_FIELDS = ("path", "class", "score", "threshold", "normalized_score", "is_anomalous", "error")


def _finite(x: Any) -> float | None:
    """JSON has no NaN/Infinity; most parsers reject them, so they become null."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


@dataclass
class Record:
    """One scored input. ``cls`` is written as ``class`` (a Python keyword)."""

    path: PathLike
    cls: str | None = None
    score: float | None = None
    threshold: float | None = None
    normalized_score: float | None = None
    is_anomalous: bool | None = None
    error: str | None = None  # None when the input was scored fine

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": os.fspath(self.path),
            "class": self.cls,
            "score": _finite(self.score),
            "threshold": _finite(self.threshold),
            "normalized_score": _finite(self.normalized_score),
            "is_anomalous": None if self.is_anomalous is None else bool(self.is_anomalous),
            # One line, so the log stays one record per line for grep, wc and our reader.
            "error": None if self.error is None else " ".join(str(self.error).splitlines()),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        return cls(d["path"], d.get("class"), d.get("score"), d.get("threshold"),
                   d.get("normalized_score"), d.get("is_anomalous"), d.get("error"))


def _csv_line(cells: Iterable[Any]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, float) else str(v)

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([cell(v) for v in cells])
    return buf.getvalue()


def format_record(record: Record | dict, fmt: str) -> str:
    """One complete line (with its newline) for ``fmt`` 'jsonl' or 'csv'."""
    d = (record if isinstance(record, Record) else Record.from_dict(record)).to_dict()
    if fmt == "jsonl":
        # ensure_ascii: undecodable file-name bytes become \udcXX escapes, which stay valid JSON.
        return json.dumps(d, ensure_ascii=True, allow_nan=False) + "\n"
    if fmt == "csv":
        return _csv_line(d[k] for k in RECORD_FIELDS)
    raise ValueError(f"unknown record format {fmt!r} (use 'jsonl' or 'csv')")


def _encode(line: str) -> bytes:
    return line.encode("utf-8", "surrogateescape")  # a raw file-name byte is written back as is


class RecordWriter:
    """Write records to a file (appending; safe with other processes appending) or a stream.

    ``target`` is a path, a text stream, or None / "-" for stdout. For files each record is
    one ``write`` under an exclusive ``flock``, then fsync'd (``durable=False`` skips that).
    """

    def __init__(
        self, target: PathLike | IO[str] | None, fmt: str = "jsonl", durable: bool = True
    ):
        format_record(Record(""), fmt)  # validates fmt early
        self.fmt, self.durable = fmt, durable
        self._fd: int | None = None
        self._stream: IO[str] | None = None
        if target is None or (not hasattr(target, "write") and os.fspath(target) == "-"):
            target = sys.stdout
        if hasattr(target, "write"):
            self._stream = target
            if fmt == "csv":
                self._emit(_csv_line(RECORD_FIELDS))
        else:  # O_RDWR, not O_WRONLY: write() peeks at the last byte of the file
            self._fd = os.open(target, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def write(self, record: Record | dict) -> None:
        line = format_record(record, self.fmt)
        if self._fd is None:
            return self._emit(line)
        data = _encode(line)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(self._fd).st_size  # read under the lock: another writer may append
            if size == 0 and self.fmt == "csv":
                data = _encode(_csv_line(RECORD_FIELDS)) + data
            elif size and os.pread(self._fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a killed writer left a torn line: start ours on a new one
            view = memoryview(data)
            while view:  # one write on local disks; the loop only matters on a partial write
                view = view[os.write(self._fd, view):]
            if self.durable:
                os.fsync(self._fd)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _emit(self, line: str) -> None:
        stream = self._stream
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:  # bytes, so undecodable file names do not crash a strict stdout
            stream.flush()
            buffer.write(_encode(line))
            buffer.flush()
        else:
            stream.write(line)
            stream.flush()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_scored_paths(
    file: PathLike, fmt: str | None = None, include_failed: bool = False
) -> set[str]:
    """Paths already in a record file, for ``--skip-existing``. A missing file is empty.

    Failed records are left out (so failures are retried) unless ``include_failed``. The
    file may end in a torn line from a killed run, or hold one in the middle (a killed
    writer followed by more appends): such lines are skipped.
    """
    try:
        raw = Path(file).read_bytes()
    except FileNotFoundError:
        return set()
    raw = raw[: raw.rfind(b"\n") + 1]  # everything after the last newline is unfinished
    text = raw.decode("utf-8", "surrogateescape")
    fmt = fmt or ("jsonl" if text.lstrip().startswith("{") else "csv")
    rows = _jsonl_rows(text) if fmt == "jsonl" else _csv_rows(text)
    return {r["path"] for r in rows if include_failed or not r.get("error")}


def _jsonl_rows(text: str) -> Iterator[dict]:
    for line in text.split("\n"):
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and isinstance(d.get("path"), str):
            yield d


def _csv_rows(text: str) -> Iterator[dict]:
    # Line by line, not one reader over the file: a torn line with an open quote would
    # otherwise swallow the records after it. (Paths with newlines are then re-scored.)
    for line in text.split("\n"):
        try:
            row = next(csv.reader([line]), [])
        except csv.Error:
            continue
        if len(row) == len(RECORD_FIELDS) and tuple(row) != RECORD_FIELDS:
            yield dict(zip(RECORD_FIELDS, row))
