"""Benchmark plots: a category's ROC, precision-recall and PRO curves as one PNG.

Pillow only (no matplotlib): three square panels with a frame, ticks, a grid, labels
and a legend that also gives each curve's metric.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .metrics import Curve


def write_curve_plots(directory: Path, curves: dict[str, dict[str, Curve]],
                      values: dict[str, dict[str, float]]) -> list[Path]:
    """One PNG per category in ``curves`` (its metrics in ``values``); returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, category_curves in curves.items():
        path = directory / f"{name}_curves.png"
        draw_curves(name, category_curves, values[name]).save(path)
        paths.append(path)
    return paths


_BLACK, _GREY = (0, 0, 0), (225, 225, 225)
_COLOURS = {"image": (31, 119, 180), "pixel": (214, 39, 40)}
_PANELS = [  # title, curve kind, x range, metric named in the legend
    ("ROC", "roc", 1.0, "auroc", "AUROC"),
    ("precision-recall", "pr", 1.0, "ap", "AP"),
    ("per-region overlap (FPR <= 0.3)", "pro", 0.3, "aupro", "AUPRO"),
]
_SIZE, _LEFT, _TOP, _GAP, _BOTTOM = 300, 70, 60, 90, 60


def draw_curves(name: str, curves: dict[str, Curve], values: dict[str, float]) -> Image.Image:
    """The category's curves as one RGB image, panels side by side."""
    width = _LEFT + len(_PANELS) * (_SIZE + _GAP) - _GAP + 30
    img = Image.new("RGB", (width, _TOP + _SIZE + _BOTTOM), "white")
    _text(img, (width // 2, 18), name, 20, anchor="mt")
    for i, (title, kind, xmax, metric, metric_name) in enumerate(_PANELS):
        series = []
        for level in ("image", "pixel"):
            curve, value = curves.get(f"{level}_{kind}"), values.get(f"{level}_{metric}")
            if curve is not None and value is not None:
                series.append((f"{level} {metric_name} {100 * value:.1f}", _COLOURS[level], curve))
        _panel(img, _LEFT + i * (_SIZE + _GAP), title, xmax, series,
               ("false positive rate", "true positive rate") if kind != "pr" else
               ("recall", "precision"), kind == "pro")
    return img


def _panel(img, left, title, xmax, series, labels, pro):
    from PIL import ImageDraw

    draw, top, size = ImageDraw.Draw(img), _TOP, _SIZE
    to_px = lambda x, y: (left + x / xmax * size, top + (1 - y) * size)  # noqa: E731
    for k in range(6):  # grid and ticks at 0, 0.2, ..., 1 of each axis
        x, y = to_px(k / 5 * xmax, k / 5)
        draw.line([(x, top), (x, top + size)], fill=_GREY)
        draw.line([(left, y), (left + size, y)], fill=_GREY)
        _text(img, (x, top + size + 4), f"{k / 5 * xmax:.2g}", 12, anchor="mt")
        _text(img, (left - 4, y), f"{k / 5:.1f}", 12, anchor="rm")
    draw.rectangle([left, top, left + size, top + size], outline=_BLACK)
    _text(img, (left + size // 2, top - 8), title, 14, anchor="md")
    x_label, y_label = ("false positive rate", "per-region overlap") if pro else labels
    _text(img, (left + size // 2, top + size + 24), x_label, 13, anchor="mt")
    _text(img, (left - 40, top + size // 2), y_label, 13, anchor="mm", vertical=True)
    for label, colour, curve in series:
        x, y = _clip(curve.x, curve.y, xmax)
        draw.line([to_px(a, b) for a, b in zip(x, y)], fill=colour, width=2)
    if series:  # legend in the lower right corner, on white so curves do not hide it
        box_top = top + size - 8 - 16 * len(series)
        draw.rectangle([left + size - 156, box_top, left + size - 4, top + size - 4],
                       fill="white", outline=_GREY)
    for j, (label, colour, _) in enumerate(series):
        ly = top + size - 14 - 16 * (len(series) - 1 - j)
        draw.line([(left + size - 150, ly), (left + size - 130, ly)], fill=colour, width=3)
        _text(img, (left + size - 125, ly), label, 12, anchor="lm")


def _clip(x, y, xmax):
    """The curve up to ``xmax``, interpolated there (the PRO panel stops at FPR 0.3)."""
    k = int(np.searchsorted(x, xmax, side="right"))
    if k == len(x) or k == 0:
        return x[:k], y[:k]
    y_end = y[k - 1] + (y[k] - y[k - 1]) * (xmax - x[k - 1]) / (x[k] - x[k - 1])
    return np.append(x[:k], xmax), np.append(y[:k], y_end)


def _font(size: int):
    from PIL import ImageFont

    try:  # scalable default font needs Pillow >= 10.1 with FreeType
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text(img, xy, text, size, anchor="la", vertical=False):
    from PIL import ImageDraw

    font = _font(size)
    if not vertical:
        ImageDraw.Draw(img).text(xy, text, fill=_BLACK, font=font, anchor=anchor)
        return
    box = ImageDraw.Draw(img).textbbox((0, 0), text, font=font)
    label = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
    ImageDraw.Draw(label).text((1, 1), text, fill=_BLACK, font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (int(xy[0] - label.width / 2), int(xy[1] - label.height / 2)))
