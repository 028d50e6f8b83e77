"""Write a small procedurally generated anomaly-detection dataset in the MVTec AD layout.

    python examples/make_dataset.py OUT_DIR [--category tile] [--train 60] [--test 10]
                                            [--size 256] [--seed 0] [--overwrite]

Layout (what ``decodiff fit`` / ``evaluate`` read for a real MVTec AD category):

    OUT/<category>/train/good/000.png              normal images
    OUT/<category>/test/good/000.png               normal test images (--test of them)
    OUT/<category>/test/<defect>/000.png           2 x --test defective ones, spread over
    OUT/<category>/ground_truth/<defect>/000_mask.png   the defect kinds; masks 0/255

Normal images are a woven texture (a checkerboard of thread bundles) with small random
changes of angle, phase, thread period, brightness, tint, lighting and sensor noise,
so a model has to learn the texture rather than memorise one picture. Defects are
drawn into a mask first and only the masked pixels are changed, so masks are exact.

Deterministic: every image has its own random generator seeded by (seed, split,
index), so ``--train 100`` gives the same first 60 images as ``--train 60``.
Needs only numpy and Pillow.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFECTS = ("scratch", "stain", "hole", "color")
_SPLIT_TRAIN, _SPLIT_GOOD, _SPLIT_DEFECT = 0, 1, 2


def normal_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free woven texture, float (size, size, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    angle = rng.uniform(-0.05, 0.05)  # about +-3 degrees: parts are never perfectly aligned
    u = xx * np.cos(angle) - yy * np.sin(angle)
    v = xx * np.sin(angle) + yy * np.cos(angle)
    period = rng.uniform(0.118, 0.132)  # about 8 cells across the image
    pu, pv = (u + rng.uniform()) / period, (v + rng.uniform()) / period
    # Alternate cells run their threads horizontally or vertically: a basket weave.
    horizontal = (np.floor(pu) + np.floor(pv)) % 2 == 0
    across = np.where(horizontal, pv, pu)
    thread = 0.5 - 0.5 * np.cos(2 * np.pi * 3 * across)  # 3 threads per cell
    shade = 0.55 + 0.35 * thread
    tint = np.array([0.85, 0.72, 0.52]) + rng.normal(0, 0.02, 3)
    light = 1 + 0.08 * (rng.uniform(-1, 1) * (xx - 0.5) + rng.uniform(-1, 1) * (yy - 0.5))
    img = (shade * light * rng.uniform(0.88, 1.08))[..., None] * tint
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1)


def _blob(rng: np.random.Generator, size: int, radius: float, corners: int) -> list[tuple]:
    """A random star-shaped polygon (an irregular blob) well inside the image."""
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
    radii = radius * rng.uniform(0.6, 1.0, corners)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]


def defect_mask(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Where the defect goes: bool (size, size), never empty."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)  # no antialiasing: every pixel is in or out
    if kind == "scratch":  # a thin, slightly bent line
        start = rng.uniform(0.15, 0.85, 2) * size
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-9
        length = rng.uniform(0.2, 0.45) * size
        bend = rng.normal(0, 0.05 * size, 2)
        points = [
            tuple(start + direction * length * f + bend * f * (1 - f) * 4) for f in (0, 0.5, 1)
        ]
        draw.line(points, fill=255, width=max(1, round(size * rng.uniform(0.008, 0.016))))
    elif kind == "stain":  # one or two round spots
        for _ in range(rng.integers(1, 3)):
            draw.polygon(_blob(rng, size, size * rng.uniform(0.03, 0.06), 12), fill=255)
    elif kind == "hole":  # a missing piece: larger and jagged
        draw.polygon(_blob(rng, size, size * rng.uniform(0.06, 0.11), 7), fill=255)
    elif kind == "color":  # a discoloured patch: same texture, wrong colour
        draw.polygon(_blob(rng, size, size * rng.uniform(0.08, 0.14), 10), fill=255)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(DEFECTS)}")
    mask = np.asarray(canvas) > 0
    if not mask.any():  # a sub-pixel shape: mark at least its first point
        mask[size // 2, size // 2] = True
    return mask


def add_defect(
    rng: np.random.Generator, img: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a defect of ``kind`` into a copy of ``img``; returns (image, mask)."""
    mask = defect_mask(rng, img.shape[0], kind)
    out = img.copy()
    region = out[mask]
    noise = rng.normal(0, 0.02, region.shape)
    if kind == "scratch":  # darker or brighter than the surface
        region = region * 0.35 if rng.uniform() < 0.5 else 0.4 + region * 0.6
    elif kind == "stain":
        region = 0.25 * region + 0.75 * np.array([0.32, 0.2, 0.1])
    elif kind == "hole":  # the dark background shows through
        region = np.full_like(region, 0.08)
    else:  # color: shift the hue, keep the texture
        region = region * np.array([0.75, 1.0, 1.35])
    out[mask] = np.clip(region + noise, 0, 1)
    return out, mask


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(img * 255).astype(np.uint8), "RGB").save(path)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path)


def make_dataset(
    out: str | Path,
    category: str = "tile",
    n_train: int = 60,
    n_test: int = 10,
    size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the dataset (n_test good + 2 * n_test defective test images); returns
    ``out/category``. Refuses a non-empty ``out`` unless ``overwrite`` (which then
    replaces only ``out/category``)."""
    out = Path(out)
    if n_train < 1 or n_test < 0 or size < 16:
        raise ValueError("need --train >= 1, --test >= 0 and --size >= 16")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace {out / category}")
    root = out / category
    if root.exists():
        shutil.rmtree(root)

    def rng(split: int, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, split, index])

    for i in range(n_train):
        _save(normal_image(rng(_SPLIT_TRAIN, i), size), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test):
        _save(normal_image(rng(_SPLIT_GOOD, i), size), root / "test" / "good" / f"{i:03d}.png")
    counts = dict.fromkeys(DEFECTS, 0)
    for i in range(2 * n_test):
        kind = DEFECTS[i % len(DEFECTS)]
        g = rng(_SPLIT_DEFECT, i)
        img, mask = add_defect(g, normal_image(g, size), kind)
        name = f"{counts[kind]:03d}"
        counts[kind] += 1
        _save(img, root / "test" / kind / f"{name}.png")
        _save_mask(mask, root / "ground_truth" / kind / f"{name}_mask.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write into (must be empty)")
    parser.add_argument("--category", default="tile", help="category folder name")
    parser.add_argument("--train", type=int, default=60, help="normal training images")
    parser.add_argument(
        "--test", type=int, default=10, help="normal test images; twice as many defective"
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/<category>")
    args = parser.parse_args(argv)
    try:
        root = make_dataset(
            args.out, args.category, args.train, args.test, args.size, args.seed, args.overwrite
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.train} train, {args.test} good and {2 * args.test} defective "
        f"test images to {root}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
