"""Large images at their own resolution: overlapping tiles in, one stitched map out.

With ``PreprocessConfig.tiles`` (``fit --tiles``) the model's input is a tile of the image
at its own resolution, not the whole image resized: a defect a few pixels wide stays a
few pixels wide. The image (its "frame", enlarged only where a side is shorter than a
tile) is cut into tiles that overlap by a quarter, each tile is scored like an image,
and the maps are averaged where tiles overlap, each weighted by a tent that falls towards
its tile's border (so no seam shows). The image score is taken from the stitched map.
Training draws a tile at a random place for every view (``latent_cache.augmented_view``).

Cost: an image is ``len(layout(...)[1])`` model inputs (a 1024x1024 image in 256x256
tiles: 25).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import torch

from decodiff_cli.anomaly_map import image_scores
from decodiff_cli.config import PreprocessConfig
from decodiff_cli.model import Inference

OVERLAP = 0.25  # of a tile's side: a defect on one tile's border is inside the next one's
Box = tuple[int, int, int, int]  # left, top, right, bottom in the frame


def frame_size(width: int, height: int, pre: PreprocessConfig) -> tuple[int, int]:
    """(W, H) of the frame the tiles are cut from: the image's own size, enlarged (aspect
    kept) where a side is shorter than a tile."""
    tile_h, tile_w = pre.shape
    scale = max(1.0, tile_w / width, tile_h / height)
    return max(tile_w, round(width * scale)), max(tile_h, round(height * scale))


def _starts(length: int, tile: int) -> list[int]:
    """Tile offsets along one side: evenly spread, the first and last flush with the ends."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile * (1 - OVERLAP))) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def layout(width: int, height: int, pre: PreprocessConfig) -> list[Box]:
    """The tiles of a frame of this size."""
    tile_h, tile_w = pre.shape
    return [(x, y, x + tile_w, y + tile_h) for y in _starts(height, tile_h) for x in _starts(width, tile_w)]


def tile_count(width: int, height: int, pre: PreprocessConfig) -> int:
    """Model inputs for one image of this original size."""
    return len(layout(*frame_size(width, height, pre), pre))


def cut(frame: torch.Tensor, pre: PreprocessConfig) -> tuple[torch.Tensor, list[Box]]:
    """(3, H, W) frame -> (T, 3, h, w) tiles and their boxes."""
    boxes = layout(frame.shape[-1], frame.shape[-2], pre)
    return torch.stack([frame[:, top:bottom, left:right] for left, top, right, bottom in boxes]), boxes


def _tent(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float32)
    return torch.minimum(i + 0.5, n - i - 0.5) / (n / 2)  # > 0 everywhere: a border no other tile covers keeps its value


def stitch(tiles: torch.Tensor, boxes: list[Box], size: tuple[int, int]) -> torch.Tensor:
    """(T, ..., h, w) per-tile values -> (..., H, W) for a (W, H) frame: the tent-weighted
    mean where tiles overlap."""
    (height, width), (h, w) = (size[1], size[0]), tiles.shape[-2:]
    weight = _tent(h)[:, None] * _tent(w)[None, :]
    total = torch.zeros(*tiles.shape[1:-2], height, width)
    weights = torch.zeros(height, width)
    for tile, (left, top, right, bottom) in zip(tiles.float(), boxes):
        total[..., top:bottom, left:right] += tile * weight
        weights[top:bottom, left:right] += weight
    return total / weights


def infer_frame(infer: Callable[[torch.Tensor], Inference], frame: torch.Tensor, pre: PreprocessConfig,
                score_top: float, batch_size: int = 8) -> Inference:
    """One frame's Inference (N = 1) from ``infer`` run on its tiles, ``batch_size`` at a
    time. Where ``infer`` chose the class per tile, the image gets the most frequent one (the
    first on a tie)."""
    tiles, boxes = cut(frame, pre)
    parts = [infer(tiles[start : start + batch_size]) for start in range(0, len(tiles), batch_size)]
    size = (frame.shape[-1], frame.shape[-2])
    amap = stitch(torch.cat([p.maps for p in parts]), boxes, size)[None]
    corrected = None
    if parts[0].corrected is not None:
        corrected = stitch(torch.cat([p.corrected for p in parts]), boxes, size)[None]
    chosen = [c for p in parts for c in (p.categories or [])]
    timings = {key: sum(p.timings.get(key, 0.0) for p in parts) for key in parts[0].timings}
    return Inference(maps=amap, scores=image_scores(amap, score_top), corrected=corrected, timings=timings,
                     categories=[Counter(chosen).most_common(1)[0][0]] if chosen else None)
