"""A labelled test set -> the paper's seven metrics per category, and reports of them.

Datasets: an MVTec AD root (``<root>/<category>/test/<defect>/*.png``, masks at
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``, ``good`` = normal), one
such category folder, or a VisA root with ``split_csv/1cls.csv``.

Protocols (docs/method.md section 7): ``paper`` resizes to 288x288 and centre-crops 256x256,
as the paper's tables do (border defects outside the crop are not scored); ``full``
resizes the whole image to 256x256; ``native`` keeps every image at its ground truth's
own resolution, as MVTec's official evaluation does (a normal image's ground truth is
all zeros at the image's size; a map of another size is resized to it, bilinearly, and
the report says how many were). Images of different sizes pool their pixels as they are.

Maps come from a folder in MVTec's evaluation layout, ``DIR/<category>/test/<defect>/
<stem>.tiff`` (or ``.npy``), or from a ``predict(paths, category)`` callable yielding
one map per path in protocol space, or a (map, image score) pair per path. A map file of
exactly 256x256 is taken to be in protocol space already (``paper``, ``full``); any
other size is taken to cover the whole image and gets the image's transform (bilinear).
Without a score of its own, an image's score is its map's maximum. A file that cannot be
read stops the evaluation with a sentence naming it: the metrics need every test image.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import Sample, discover  # noqa: F401  (discover: part of this module's API)
from .images import ImageReadError, decode_file, image_size, mask_levels, read_bytes
from .metrics import METRIC_KEYS, Curve, compute_metrics
from .plots import write_curve_plots

PROTOCOLS = {"paper": (288, 256), "full": (256, 256)}  # name -> (resize side, crop side)
NATIVE = "native"  # every image at its ground truth's own resolution
PROTOCOL_NAMES = (*PROTOCOLS, NATIVE)
Predict = Callable[[list[Path], str], Iterable[np.ndarray | tuple[np.ndarray, float]]]
Progress = Callable[[str, int, int], None]  # (category, maps done, maps in category)


# --------------------------------------------------------------------------- loading
def _read(kind: str, path: Path, read):
    """read(path); a failure becomes one sentence naming the file and what it is."""
    try:
        return read(path)
    except ImageReadError as err:
        raise ValueError(f"cannot read {kind} {err.name}: {err.problem}.") from None


def load_mask(path: Path) -> np.ndarray:
    """A ground-truth mask as bool at its own resolution: above half of its value range, by
    the one rule every mask in decodiff is read with (``images.mask_levels``)."""
    image = _read("mask", path, decode_file)
    try:
        return mask_levels(image) > 0.5
    except ImageReadError as err:  # decoded, but not a 2-D mask
        raise ValueError(f"cannot read mask {path}: {err.problem}.") from None


def load_map(path: Path) -> np.ndarray:
    """A stored anomaly map (float TIFF, Pillow mode 'F', or .npy) as float32 (H, W)."""
    if path.suffix.lower() == ".npy":
        data = _read("anomaly map", path, read_bytes)
        try:
            a = np.squeeze(np.load(io.BytesIO(data), allow_pickle=False)).astype(np.float32)
        except Exception as e:  # numpy raises ValueError, EOFError, OSError, ... on a bad file
            raise ValueError(f"cannot read anomaly map {path}: {e or type(e).__name__}") from None
    else:
        im = _read("anomaly map", path, decode_file)
        try:
            a = np.asarray(im if im.mode == "F" else im.convert("F"), dtype=np.float32)
        except Exception as e:
            raise ValueError(f"cannot read anomaly map {path}: {e or type(e).__name__}") from None
    if a.ndim != 2:
        raise ValueError(f"anomaly map {path} has shape {a.shape}; expected one 2-D map")
    return a


def to_protocol(a: np.ndarray, protocol: str) -> np.ndarray:
    """Resize a whole-image float array bilinearly (and centre-crop) like the images."""
    resize, crop = _sides(protocol)
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    im = im.resize((resize, resize), Image.Resampling.BILINEAR)
    off = (resize - crop) // 2
    return np.asarray(im, dtype=np.float32)[off:off + crop, off:off + crop]


def resize_map(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float map resized bilinearly to ``shape`` (H, W)."""
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def _sides(protocol: str) -> tuple[int, int]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOL_NAMES)}")
    return PROTOCOLS[protocol]


def native_mask(sample: Sample) -> np.ndarray:
    """The ground truth at its own resolution: the mask, or zeros of the image's size for a
    normal image (the header is read, so a broken test image stops the evaluation)."""
    width, height = _read("image", sample.image, image_size)  # header only: pixels not decoded
    if sample.mask is None:
        return np.zeros((height, width), dtype=bool)
    mask = load_mask(sample.mask)
    if mask.shape != (height, width):
        raise ValueError(f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} but its "
                         f"image {sample.image} is {width}x{height}")
    return mask


def _protocol_mask(sample: Sample, protocol: str) -> np.ndarray:
    if protocol == NATIVE:
        return native_mask(sample)
    crop = _sides(protocol)[1]
    if sample.mask is None:
        return np.zeros((crop, crop), dtype=bool)
    # Interpolate the 0/1 mask like an image, then binarise at half its range.
    return to_protocol(native_mask(sample).astype(np.float32), protocol) > 0.5


def _stored_map(maps_dir: Path, category: str, sample: Sample, protocol: str) -> np.ndarray:
    base = Path(maps_dir) / category / "test" / sample.defect / sample.image.stem
    path = next((base.with_suffix(s) for s in (".tiff", ".tif", ".npy")
                 if base.with_suffix(s).is_file()), None)
    if path is None:
        raise ValueError(f"no anomaly map for {sample.image}: expected {base}.tiff or .npy")
    a = load_map(path)
    if protocol == NATIVE:
        return a  # evaluate() compares it with the mask's size
    crop = _sides(protocol)[1]
    return a if a.shape == (crop, crop) else to_protocol(a, protocol)


# --------------------------------------------------------------------------- evaluation
@dataclass
class BenchmarkResult:
    protocol: str
    categories: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    curves: dict[str, dict[str, Curve]] = field(default_factory=dict)
    # category -> defect type -> metrics of that type's images beside the normal ones
    defects: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)  # filled in by the caller

    @property
    def mean(self) -> dict[str, float]:
        """Mean over the categories where each metric is defined (NaN if none)."""
        out = {}
        for key in METRIC_KEYS:
            vals = [v[key] for v in self.categories.values() if not math.isnan(v[key])]
            out[key] = float(np.mean(vals)) if vals else float("nan")
        return out

    def to_dict(self) -> dict:
        def clean(d):  # JSON has no NaN: undefined metrics are null
            return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in d.items()}
        out = {"protocol": self.protocol,
               "categories": {n: clean(v) for n, v in self.categories.items()},
               "mean": clean(self.mean), "speed": clean(self.speed), "notes": self.notes}
        if self.defects:
            out["defects"] = {n: {d: clean(v) for d, v in kinds.items()} for n, kinds in self.defects.items()}
        return out

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def rows(self) -> list[tuple[str, list[str]]]:
        """(name, formatted cells) per category (each followed by its defect types, as
        "category/defect", when measured) and the mean, in percent like the paper."""
        def fmt(d):
            return ["n/a" if math.isnan(d[k]) else f"{100 * d[k]:.1f}" for k in METRIC_KEYS]

        rows = []
        for name, values in self.categories.items():
            rows.append((name, fmt(values)))
            rows += [(f"{name}/{kind}", fmt(v)) for kind, v in self.defects.get(name, {}).items()]
        return rows + [("mean", fmt(self.mean))]

    def to_markdown(self) -> str:
        lines = ["| category | " + " | ".join(HEADERS) + " |",
                 "|---|" + "---:|" * len(HEADERS)]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in self.rows()]
        return "\n".join(lines) + "\n"

    def rich_table(self, title: str | None = None):
        from rich.table import Table  # imported here: only the terminal report needs it

        table = Table(title=title or f"DeCo-Diff benchmark ({self.protocol} protocol, %)")
        table.add_column("category")
        for h in HEADERS:
            table.add_column(h, justify="right")
        table.columns[0].no_wrap = True
        rows = self.rows()
        for i, (name, cells) in enumerate(rows):
            _, slash, kind = name.partition("/")  # a defect row: its type alone, under its category
            table.add_row(f"  {kind}" if slash else name, *cells, style="dim" if slash else None,
                          end_section=i == len(rows) - 2)
        return table

    def write_plots(self, directory: Path) -> list[Path]:
        """One PNG per category with its ROC, PR and PRO curves; returns the paths."""
        return write_curve_plots(directory, self.curves, self.categories)


HEADERS = ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"]


def evaluate(dataset: Path, *, categories: Sequence[str] | None = None,
             protocol: str = "paper", maps_dir: Path | None = None,
             predict: Predict | None = None, progress: Progress | None = None,
             curve_points: int = 300, per_defect: bool = False) -> BenchmarkResult:
    """Score every test image of every category and compute the seven metrics; with
    ``per_defect``, also for each defect type's images beside the category's normal ones
    (which types a model misses: they share one number in the category's metrics).

    Give exactly one of ``maps_dir`` (stored maps) or ``predict`` (a callable that owns
    the model and its batching). Maps live for one category at a time, in float32.
    """
    if (maps_dir is None) == (predict is None):
        raise ValueError("give exactly one source of anomaly maps: a maps folder or a model")
    native = protocol == NATIVE
    crop = None if native else _sides(protocol)[1]
    result = BenchmarkResult(protocol)
    for cat in discover(dataset, categories):
        # Ground truth first: a bad mask should fail before any model time is spent.
        # native: lists, one array per image at its own size; otherwise (N, crop, crop).
        masks = [native_mask(s) for s in cat.samples] if native else \
            np.stack([_protocol_mask(s, protocol) for s in cat.samples])
        maps = [None] * len(masks) if native else np.empty(masks.shape, dtype=np.float32)
        scores = np.full(len(maps), np.nan)  # NaN: the map's maximum
        stream = (predict([s.image for s in cat.samples], cat.name) if predict else
                  (_stored_map(maps_dir, cat.name, s, protocol) for s in cat.samples))
        count, total, resized = 0, len(cat.samples), 0
        for count, a in enumerate(stream, 1):
            if count > total:
                raise ValueError(f"the model gave more than {total} anomaly maps for the "
                                 f"{total} test images of {cat.name}")
            if isinstance(a, tuple):
                a, scores[count - 1] = a
            a = np.asarray(a, dtype=np.float32).squeeze()
            want = masks[count - 1].shape if native else (crop, crop)
            if native and a.ndim == 2 and a.size and a.shape != want:
                a, resized = resize_map(a, want), resized + 1
            if a.shape != want:
                raise ValueError(f"anomaly map for {cat.samples[count - 1].image} has shape "
                                 f"{a.shape}; the {protocol} protocol needs {want[1]}x{want[0]}")
            maps[count - 1] = a
            if progress:
                progress(cat.name, count, total)
        if count != total:
            raise ValueError(f"the model gave {count} anomaly maps for the "
                             f"{total} test images of {cat.name}")
        if resized:
            result.notes.append(f"{cat.name}: {resized} of {total} anomaly maps were not at their ground "
                                f"truth's resolution and were resized to it (bilinear)")
        labels = np.array([s.label for s in cat.samples])
        scores = np.where(np.isnan(scores), [float(m.max()) for m in maps], scores)
        m = compute_metrics(scores, labels, maps, masks, curve_points=curve_points)
        result.categories[cat.name] = m.values
        result.curves[cat.name] = m.curves
        result.notes += [f"{cat.name}: {note}" for note in m.notes]
        if per_defect:
            kinds = np.array([s.defect for s in cat.samples])
            for kind in sorted(set(kinds[labels == 1])):
                rows = (kinds == kind) | (labels == 0)
                pick = (lambda a: [a[i] for i in np.flatnonzero(rows)]) if native else (lambda a: a[rows])
                result.defects.setdefault(cat.name, {})[kind] = compute_metrics(
                    scores[rows], labels[rows], pick(maps), pick(masks), curve_points=curve_points).values
        del maps, masks  # before the next category's arrays
    for key, value in result.mean.items():
        undefined = [n for n, v in result.categories.items() if math.isnan(v[key])]
        if undefined and not math.isnan(value):
            result.notes.append(f"mean {key} leaves out {', '.join(undefined)}, where it is "
                                f"undefined")
    return result
