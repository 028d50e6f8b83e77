"""What the folders decodiff reads look like, in one place: image file names, the MVTec AD
layout (``<category>/train/good``, ``<category>/test/<defect>/<id>``,
``<category>/ground_truth/<defect>/<id>_mask.png`` or ``<id>.png``) and a bundle folder.

No torch here: `inputs.py` (and so `decodiff --help`) imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
    | {".ppm", ".pgm", ".pbm", ".pnm"}  # compared lower-cased: .PNG and .Jpg count too
)
NORMAL = "good"  # the normal "defect" folder; VisA's normal/anomaly become good/bad
BUNDLE_CONFIG, BUNDLE_DENOISER = "config.json", "denoiser.safetensors"  # the files that make a bundle


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
