"""Score records: one JSONL or CSV line per scored input, appended safely, read back for resumes.

A score log can always be parsed and resumed with ``--skip-existing``, even after a writer
was killed half-way through a line.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

PathLike = str | os.PathLike

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
