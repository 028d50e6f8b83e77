"""Tiles (fit --tiles): the layout covers every image, and stitching undoes cutting."""

import pytest
import torch

from decodiff_cli.config import PreprocessConfig, TrainConfig
from decodiff_cli.latent_cache import augmented_view
from decodiff_cli.tiles import cut, frame_size, layout, stitch, tile_count

TILE = PreprocessConfig(image_size=64, resize=64, tiles=True)
WIDE = PreprocessConfig(image_size=64, resize=64, image_height=32, tiles=True)


@pytest.mark.parametrize("size", [(64, 64), (65, 64), (200, 120), (1000, 70), (64, 500)])
def test_the_tiles_cover_the_frame_and_overlap_by_at_least_a_quarter(size):
    width, height = frame_size(*size, TILE)
    boxes = layout(width, height, TILE)
    covered = torch.zeros(height, width)
    for left, top, right, bottom in boxes:
        assert (right - left, bottom - top) == (64, 64) and left >= 0 and top >= 0
        assert right <= width and bottom <= height
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    xs = sorted({box[0] for box in boxes})
    assert all(b - a <= 48 for a, b in zip(xs, xs[1:]))  # stride at most 3/4 of a tile
    assert tile_count(*size, TILE) == len(boxes)


def test_an_image_smaller_than_a_tile_is_enlarged_to_one_keeping_its_shape():
    assert frame_size(32, 16, TILE) == (128, 64)
    assert frame_size(300, 20, WIDE) == (480, 32)
    assert frame_size(640, 480, TILE) == (640, 480)


def test_stitching_the_tiles_of_a_frame_gives_the_frame_back():
    frame = torch.rand(3, 90, 170)
    tiles, boxes = cut(frame, TILE)
    assert tiles.shape == (len(boxes), 3, 64, 64)
    assert torch.allclose(stitch(tiles, boxes, (170, 90)), frame, atol=1e-6)
    maps = tiles[:, 0]  # (T, h, w) maps stitch the same way
    assert torch.allclose(stitch(maps, boxes, (170, 90)), frame[0], atol=1e-6)


def test_training_views_are_tiles_at_reproducible_random_places():
    image, cfg = torch.rand(3, 100, 150), TrainConfig(seed=3)
    views = [augmented_view(image, cfg, 5, view, (64, 64)) for view in range(4)]
    assert all(v.shape == (3, 64, 64) for v in views)
    assert torch.equal(views[1], augmented_view(image, cfg, 5, 1, (64, 64)))
    assert not torch.equal(views[0], views[2])


def test_tiles_take_no_crop():
    with pytest.raises(ValueError, match="no --resize"):
        PreprocessConfig(image_size=64, resize=80, tiles=True)


def test_tiles_drop_the_preset_s_crop_but_not_one_the_user_asked_for():
    from decodiff_cli.presets import build_config

    for preset in ("cpu", "paper"):
        pre = build_config(preset, {"tiles": True, "image_size": "320"}).preprocess
        assert (pre.tiles, pre.image_size, pre.resize, pre.auto_shape) == (True, 320, 320, False)
    with pytest.raises(ValueError, match="no --resize"):
        build_config("cpu", {"tiles": True, "resize": 288})
