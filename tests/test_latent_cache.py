"""The latent cache: views, the time limit on extra views, RAM vs disk."""

from __future__ import annotations

import torch

from decodiff_cli.autoencoders.pixel import PixelAutoencoder
from decodiff_cli.config import TrainConfig
from decodiff_cli.latent_cache import augmented_view, build_cache


def _images(n: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 32, 32, generator=generator) * 2 - 1 for _ in range(n)]


def test_all_views_without_a_time_limit_and_view_zero_is_the_image():
    images, ae = _images(), PixelAutoencoder()
    cache = build_cache(images, len(images), ae, TrainConfig(augment_variants=4), torch.device("cpu"))
    assert cache.latents.shape == (5, 4, 192, 4, 4)
    torch.testing.assert_close(cache.latents[:, 0].float(), ae.encode(torch.stack(images)).half().float())
    assert not torch.equal(cache.latents[:, 0], cache.latents[:, 1])  # shifted views differ


def test_a_spent_time_limit_keeps_only_the_first_view():
    images = _images()
    cache = build_cache(images, len(images), PixelAutoencoder(), TrainConfig(augment_variants=4),
                        torch.device("cpu"), time_limit_s=0.0)
    assert cache.latents.shape[1] == 1
    batch = cache.batch(torch.tensor([0, 3]), torch.tensor([0, 0]))
    assert batch.shape == (2, 192, 4, 4)


def test_views_are_reproducible_one_by_one():
    image, cfg = _images(1)[0], TrainConfig(augment_variants=4, hflip=True, seed=3)
    assert torch.equal(augmented_view(image, cfg, 2, 1), augmented_view(image, cfg, 2, 1))
    assert not torch.equal(augmented_view(image, cfg, 2, 1), augmented_view(image, cfg, 3, 1))
    assert torch.equal(augmented_view(image, cfg, 7, 0), image)


def test_disk_cache_matches_ram(tmp_path):
    images, cfg = _images(), TrainConfig(augment_variants=3)
    ram = build_cache(images, len(images), PixelAutoencoder(), cfg, torch.device("cpu"))
    disk = build_cache(images, len(images), PixelAutoencoder(), cfg, torch.device("cpu"),
                       folder=tmp_path, key="k", ram_limit_bytes=0)
    assert disk.on_disk and torch.equal(torch.from_numpy(disk.latents.copy()), ram.latents)
