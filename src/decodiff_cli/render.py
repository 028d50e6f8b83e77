"""Rendering anomaly maps: heatmaps, overlays, binary masks, images and raw float TIFF maps.

Every file is written atomically (see files.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from decodiff_cli.files import atomic_writer

PathLike = str | os.PathLike

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
