"""Output paths: where each input's result files go under one output folder.

Names never depend on processing order, never collide (a short hash is added), never land
outside the output folder and never over an input.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from decodiff_cli.datasets import is_mvtec_test_image

PathLike = str | os.PathLike

# Suffix per product. None is a suffix of another, so two stems give the same file only if
# they are equal: collisions between products reduce to collisions between stems.
PRODUCTS = {
    "anomaly_map": ".tiff",  # raw float map, the file MVTec's evaluation reads
    "heatmap": "_heatmap.png",
    "overlay": "_overlay.png",
    "mask": "_mask.png",
    "reconstruction": "_recon.png",
    "input": "_input.png",  # the image as read, beside its correction in the gallery
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
    input: Path

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
