"""Which files to process: command-line items (files, folders, globs, ``-``) -> image paths.

Nothing here opens an image; reading (and its clear errors) is ``images.read_image``'s
job. Problems (a missing path, an empty folder, a broken link) are returned as
``(item, sentence)`` pairs rather than raised, so one bad item does not stop a batch
of thousands: the caller decides whether a problem is fatal.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from decodiff_cli.datasets import IMAGE_SUFFIXES, is_bundle, is_image_name, show_path


Problem = tuple[str, str]
_GLOB_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class InputImage:
    path: Path
    root: Path | None = None  # the folder the user named; None for a file, glob or stdin path

    @property
    def relative(self) -> Path:
        """Where to put outputs: the path under the named folder, or just the file name."""
        if self.root is not None:
            try:
                return self.path.relative_to(self.root)
            except ValueError:
                pass
        return Path(self.path.name)


def _is_broken_link(path: Path) -> bool:
    return os.path.islink(path) and not os.path.exists(path)


def _walk(folder: Path) -> tuple[list[Path], list[Problem]]:
    """Image files under ``folder``, recursively, in sorted (deterministic) order.

    Symlinked folders are followed, but each real folder is visited once, so a link
    back to a parent ends instead of recursing forever. Hidden entries (``.git``,
    macOS ``._name.png`` resource forks) are skipped: they are never images to score.
    """
    found: list[Path] = []
    problems: list[Problem] = []
    visited: set[str] = set()

    def visit(d: Path) -> None:
        real = os.path.realpath(d)
        if real in visited:
            return
        visited.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append((str(d), f"the folder {show_path(d)} cannot be read ({e.strerror})."))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                visit(path)
            elif is_image_name(path):
                if _is_broken_link(path):
                    problems.append((str(path), f"{show_path(path)} is a broken symbolic link."))
                else:
                    found.append(path)

    visit(folder)
    return found, problems


def _dedup(images: list[InputImage]) -> list[InputImage]:
    """Drop later copies of the same file (same resolved path), keeping the first."""
    seen: set[str] = set()
    out = []
    for im in images:
        key = os.path.realpath(im.path)
        if key not in seen:
            seen.add(key)
            out.append(im)
    return out


def _no_images(folder: str | os.PathLike) -> str:
    kinds = ", ".join(sorted(IMAGE_SUFFIXES))
    return f"the folder {show_path(folder)} contains no images ({kinds})."


def _expand_one(item: str, allow_glob: bool) -> tuple[list[InputImage], list[Problem]]:
    path = Path(item)
    if os.path.lexists(path):
        if _is_broken_link(path):
            return [], [(item, f"{show_path(path)} is a broken symbolic link.")]
        if os.path.isdir(path):
            files, problems = _walk(path)
            if not files and not problems:
                problems = [(item, _no_images(path))]
            return [InputImage(f, path) for f in files], problems
        # Named explicitly: kept whatever its suffix; reading will say if it is no image.
        return [InputImage(path, None)], []
    if allow_glob and _GLOB_MAGIC.search(item):
        return _expand_glob(item)
    return [], [(item, f"{show_path(path)} does not exist.")]


def _expand_glob(pattern: str) -> tuple[list[InputImage], list[Problem]]:
    """Files matched by a pattern (filtered by suffix); matched folders are walked."""
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        return [], [(pattern, f"no file matches the pattern {show_path(pattern)}.")]
    images: list[InputImage] = []
    problems: list[Problem] = []
    for m in map(Path, matches):
        if os.path.isdir(m):
            files, probs = _walk(m)
            images += [InputImage(f, m) for f in files]
            problems += probs
        elif is_image_name(m):
            if _is_broken_link(m):
                problems.append((str(m), f"{show_path(m)} is a broken symbolic link."))
            else:
                images.append(InputImage(m, None))
    if not images and not problems:
        problems.append((pattern, f"the pattern {show_path(pattern)} matches no images."))
    return images, problems


def expand_inputs(
    items: list[str], stdin: TextIO | None = None
) -> tuple[list[InputImage], list[Problem]]:
    """Files, folders (recursive), globs (``*``, ``**``) and ``-`` (paths on stdin).

    Returns the images in the order given (folders sorted), without duplicates, and the
    problems found on the way.
    """
    images: list[InputImage] = []
    problems: list[Problem] = []
    for item in items:
        if item == "-":
            # Paths from stdin are taken literally (no globbing): they come from tools
            # like `find`, where a `*` or `[` in a name is part of the name.
            for line in stdin if stdin is not None else sys.stdin:
                line = line.strip()
                if line:
                    found, probs = _expand_one(line, allow_glob=False)
                    images += found
                    problems += probs
        else:
            found, probs = _expand_one(item, allow_glob=True)
            images += found
            problems += probs
    return _dedup(images), problems


# ------------------------------------------------------------------------ training
# os.path's tests are used throughout: they answer False on any OSError (a folder we
# may not enter), where pathlib's raise in Python 3.11.


def _name(folder: Path) -> str:
    return Path(os.path.abspath(folder)).name  # "." and ".." become real names


def _training_folders(folder: Path) -> list[tuple[str, Path]]:
    """(category, folder of normal images) for one folder the user named.

    MVTec AD / VisA layouts: a dataset root (subfolders with ``train/good``), one
    category (``train/good`` inside) or its ``train`` folder. Anything else is a plain
    folder of normal images named after itself. Only ``train/good`` is used from a
    dataset: its ``test`` folders hold defects, which must never be trained on.
    """
    if os.path.isdir(folder / "train" / "good"):
        return [(_name(folder), folder / "train" / "good")]
    if _name(folder) == "train" and os.path.isdir(folder / "good"):
        return [(Path(os.path.abspath(folder)).parent.name, folder / "good")]
    try:
        subs = sorted(p for p in folder.iterdir() if os.path.isdir(p / "train" / "good"))
    except OSError:
        subs = []
    if subs:
        return [(p.name, p / "train" / "good") for p in subs]
    return [(_category_of_folder(folder), folder)]


def _category_of_folder(folder: Path) -> str:
    absolute = Path(os.path.abspath(folder))
    if absolute.name == "good" and absolute.parent.name == "train":
        return absolute.parent.parent.name  # mvtec/bottle/train/good -> "bottle"
    return absolute.name


def _add_folder(
    item: str, folder: Path, by_category: dict[str, list[InputImage]], problems: list[Problem]
) -> None:
    if is_bundle(folder):
        raise ValueError(f"{item} is a decodiff bundle, not a folder of images")
    for category, images in _training_folders(folder):
        files, probs = _walk(images)
        problems += probs
        if not files and not probs:
            problems.append((str(images), _no_images(images)))
        if files:
            by_category.setdefault(category, []).extend(InputImage(f, images) for f in files)


def find_training_images(items: list[str]) -> tuple[dict[str, list[Path]], list[Problem]]:
    """Normal images for ``fit``, by category (see ``_training_folders``).

    A file belongs to the category named by its folder; folders matched by a glob
    (``mvtec/*``) are treated like named folders, so their test defects stay out.
    Raises ValueError when an item is a decodiff bundle (an easy slip: `fit model/`).
    """
    by_category: dict[str, list[InputImage]] = {}
    problems: list[Problem] = []

    def add_file(im: InputImage) -> None:
        by_category.setdefault(_category_of_folder(im.path.parent), []).append(im)

    for item in items:
        path = Path(item)
        if os.path.isdir(path):
            _add_folder(item, path, by_category, problems)
        elif not os.path.lexists(path) and _GLOB_MAGIC.search(item):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            for m in matches:
                if os.path.isdir(m):
                    _add_folder(str(m), m, by_category, problems)
                elif is_image_name(m):
                    found, probs = _expand_one(str(m), allow_glob=False)
                    problems += probs
                    for im in found:
                        add_file(im)
            if not matches:
                problems.append((item, f"no file matches the pattern {show_path(item)}."))
        else:
            found, probs = _expand_one(item, allow_glob=False)
            problems += probs
            for im in found:
                add_file(im)
    return {c: [im.path for im in _dedup(ims)] for c, ims in sorted(by_category.items())}, problems
