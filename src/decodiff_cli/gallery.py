"""The HTML gallery: a static index.html of scores, decisions and images, highest score first."""

from __future__ import annotations

import dataclasses
import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from decodiff_cli.files import atomic_write_text

PathLike = str | os.PathLike

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
    input: PathLike | None = None  # the image as read: beside its correction, the repair shows
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
    for img in (e.input, e.reconstruction, e.heatmap, e.overlay):
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
    columns = ("image", "score", "threshold", "decision", "input", "corrected", "heatmap", "overlay")
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
