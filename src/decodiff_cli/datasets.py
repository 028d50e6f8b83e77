"""What the folders decodiff reads look like, in one place: image file names, the MVTec AD
layout (``<category>/train/good``, ``<category>/test/<defect>/<id>``,
``<category>/ground_truth/<defect>/<id>_mask.png`` or ``<id>.png``), VisA's test split
(``split_csv/1cls.csv``), a bundle folder, and how a path is shown in a message.

No torch here: `inputs.py` (and so `decodiff --help`) imports it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
    | {".ppm", ".pgm", ".pbm", ".pnm"}  # compared lower-cased: .PNG and .Jpg count too
)
NORMAL = "good"  # the normal "defect" folder; VisA's normal/anomaly become good/bad
BUNDLE_CONFIG, BUNDLE_DENOISER = "config.json", "denoiser.safetensors"  # the files that make a bundle


def show_path(path: str | os.PathLike) -> str:
    """A printable path: undecodable bytes in a file name become \\x escapes."""
    return repr(os.fsencode(path).decode("utf-8", "backslashreplace"))


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_bundle(folder: str | os.PathLike) -> bool:
    """A folder `decodiff fit` wrote (its config and weights), not a folder of images."""
    return all(os.path.isfile(Path(folder) / name) for name in (BUNDLE_CONFIG, BUNDLE_DENOISER))


def mask_candidates(image: Path) -> list[Path]:
    """Where MVTec AD keeps a defective test image's mask, in the order looked for:
    <cat>/test/<defect>/<id>.png -> <cat>/ground_truth/<defect>/<id>_mask.png, or <id>.png."""
    gt = image.parent.parent.parent / "ground_truth" / image.parent.name
    return [gt / f"{image.stem}_mask.png", gt / f"{image.stem}.png"]


def find_mask(image: Path) -> Path | None:
    """The mask of a defective MVTec-layout test image, if there is one."""
    return next((m for m in mask_candidates(image) if m.is_file()), None)


def is_mvtec_test_image(path: str | os.PathLike) -> bool:
    """``.../<category>/test/<defect>/<file>`` where the category also holds ``train`` or
    ``ground_truth``: the sibling check keeps any folder that happens to be named 'test'
    from being taken for MVTec."""
    parts = Path(path).parts
    if len(parts) < 5 or parts[-3] != "test":  # parts[0] is '/', so 5 = category and below
        return False
    category = Path(*parts[:-3])
    return any((category / d).is_dir() for d in ("train", "ground_truth"))


# ------------------------------------------------------------- labelled test sets
@dataclass
class Sample:
    image: Path
    mask: Path | None  # None for normal images
    defect: str  # folder name under test/; "good" for normal images
    label: int  # 1 = anomalous


@dataclass
class Category:
    name: str
    samples: list[Sample]


# --------------------------------------------------------------------------- discovery
def discover(root: Path, categories: Sequence[str] | None = None) -> list[Category]:
    """Find the test images and masks of every (selected) category under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist")
    if (root / "split_csv" / "1cls.csv").is_file():
        found = _discover_visa(root, root / "split_csv" / "1cls.csv")
    elif (root / "test").is_dir():
        found = {root.name: root}
    else:
        found = {p.name: p for p in sorted(root.iterdir()) if (p / "test").is_dir()}
        if not found:
            raise ValueError(f"no dataset found in {root}: expected <category>/test/<defect>/"
                             f"images (MVTec AD), a test/ folder, or split_csv/1cls.csv (VisA)")
    names = list(found) if not categories else list(dict.fromkeys(categories))
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"category {', '.join(missing)} not found in {root}; "
                         f"available: {', '.join(found)}")
    out = []
    for name in names:
        entry = found[name]  # a Category (VisA, already read) or a category folder
        cat = entry if isinstance(entry, Category) else _mvtec_category(entry, name)
        if not cat.samples:
            raise ValueError(f"no test images for category {name} in {root}")
        out.append(cat)
    return out


def _mvtec_category(folder: Path, name: str) -> Category:
    samples = []
    for defect_dir in sorted(p for p in (folder / "test").iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in sorted(p for p in defect_dir.iterdir() if is_image_name(p)):
            mask = None
            if defect != NORMAL:
                mask = find_mask(image)
                if mask is None:
                    raise ValueError(f"mask missing for defective image {image}: "
                                     f"expected {mask_candidates(image)[0]}")
            samples.append(Sample(image, mask, defect, int(defect != NORMAL)))
    return Category(name, samples)


def _discover_visa(root: Path, split: Path) -> dict[str, Category]:
    cats: dict[str, Category] = {}
    with open(split, newline="") as f:
        for row in csv.DictReader(f):
            if row["split"].strip() != "test":
                continue
            name, anomalous = row["object"].strip(), row["label"].strip() == "anomaly"
            mask = root / row["mask"].strip() if anomalous else None
            if anomalous and (not row["mask"].strip() or not mask.is_file()):
                raise ValueError(f"mask missing for defective image {root / row['image']}: "
                                 f"expected {mask}")
            image = root / row["image"].strip()
            if not image.is_file():
                raise ValueError(f"image {image}, listed in {split}, does not exist")
            sample = Sample(image, mask, "bad" if anomalous else NORMAL, int(anomalous))
            cats.setdefault(name, Category(name, [])).samples.append(sample)
    return cats
