"""Encode each training image once (per augmentation view) and train on cached latents.

The autoencoder is frozen, so running it on every step would only repeat work: with
TAEF2 on a CPU, encoding costs more than the denoiser's own step. Each image is encoded
in ``augment_variants`` views: the original plus copies shifted by up to ``max_shift``
pixels (the paper's random translation), flipped where asked. A training step picks one
view per image at random. Under a time budget, views beyond the first are encoded only
while they fit in a quarter of it.

Small caches live in RAM; caches larger than ``ram_limit_bytes`` are written to an .npy
file in the work folder and memory-mapped, so datasets larger than RAM still train.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from decodiff_cli.autoencoders import Autoencoder
from decodiff_cli.config import PreprocessConfig, TrainConfig

RAM_LIMIT_BYTES = 4 << 30


@dataclass
class LatentCache:
    latents: np.ndarray | torch.Tensor  # (N, V, C, h, w) float16 raw latents; (N, V, 2C, h, w) with posterior
    on_disk: bool
    # True: each latent is stored as the encoder posterior's mean and log-variance, stacked
    # on the channels, so that training draws a fresh sample each step (docs/method.md 1).
    posterior: bool = False

    def means(self, stored: torch.Tensor) -> torch.Tensor:
        """Rows read with ``batch`` -> the latents themselves (the posterior's mean)."""
        return stored[:, : stored.shape[1] // 2] if self.posterior else stored

    def samples(self, stored: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Rows read with ``batch`` -> one posterior sample per row, row i drawn from
        ``generators[i]`` (the mean itself without a posterior)."""
        if not self.posterior:
            return stored
        mean, logvar = stored.chunk(2, dim=1)
        noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]) if len(stored) else mean
        return mean + (0.5 * logvar).exp() * noise.to(mean)

    @property
    def num_images(self) -> int:
        return self.latents.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.latents.shape)) * 2

    def batch(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Raw float32 latents of the given (image, view) pairs."""
        if self.on_disk:
            if not len(images):
                return torch.empty(0, *self.latents.shape[2:])
            # np.array copies out of the read-only memmap (torch.from_numpy warns on those)
            rows = [torch.from_numpy(np.array(self.latents[i, v])) for i, v in zip(images.tolist(), views.tolist())]
            return torch.stack(rows).float()
        return self.latents[images, views].float()


def augmented_view(image: torch.Tensor, cfg: TrainConfig, index: int, view: int,
                   tile: tuple[int, int] | None = None) -> torch.Tensor:
    """(3, H, W) -> view ``view`` of image ``index``: view 0 is the image itself, the
    others shifted (and flipped where asked), drawn from a generator seeded by
    (seed, image, view) so that any view can be made again on its own. With ``tile``
    (h, w), every view is first a tile at a random place of the image (tiles.py)."""
    generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + index) * 64 + view)
    if tile is not None:
        top, left = (int(torch.randint(0, side - want + 1, (1,), generator=generator))
                     for side, want in zip(image.shape[-2:], tile))
        image = image[:, top : top + tile[0], left : left + tile[1]]
    if view == 0:
        return image
    (height, width), pad = image.shape[-2:], cfg.max_shift
    out = image
    if pad:
        dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        out = F.pad(image[None], (pad, pad, pad, pad), mode="replicate")[0][:, dy : dy + height, dx : dx + width]
    if cfg.hflip and torch.rand(1, generator=generator) < 0.5:
        out = out.flip(-1)
    if cfg.vflip and torch.rand(1, generator=generator) < 0.5:
        out = out.flip(-2)
    return out


def cache_key(paths: Sequence[Path], pre: PreprocessConfig, cfg: TrainConfig, autoencoder_spec: str) -> str:
    """Identifies a cache: same files, geometry, views and autoencoder -> same latents."""
    parts = {
        "files": [str(p) for p in paths],
        "pre": [pre.image_size, pre.resize, pre.image_height] + (["tiles"] if pre.tiles else []),
        "views": [cfg.augment_variants, cfg.max_shift, cfg.hflip, cfg.vflip, cfg.seed],
        "autoencoder": autoencoder_spec,
    }
    if cfg.posterior_samples:  # only then: the keys of caches without a posterior stay as they were
        parts["posterior"] = True
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def build_cache(
    images: Sequence[torch.Tensor] | Callable[[int], torch.Tensor],
    count: int,
    autoencoder: Autoencoder,
    cfg: TrainConfig,
    device: torch.device,
    folder: Path | None = None,
    key: str = "",
    ram_limit_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    time_limit_s: float | None = None,
    tile: tuple[int, int] | None = None,
) -> LatentCache:
    """Encode ``count`` images (a list, or a function index -> (3, S, S) tensor).

    Views are encoded one after the other for all images (view 0, the image itself,
    first). With ``time_limit_s``, no further view is started once it would end past the
    limit: a short time budget is then spent training, not encoding (at least view 0).
    ``ram_limit_bytes`` defaults to the module's RAM_LIMIT_BYTES, read at call time (not
    bound when this function is defined) so that setting it reaches callers like fit().
    ``tile`` (h, w): every view is a tile at a random place of its image (images of any size).
    """
    if ram_limit_bytes is None:
        ram_limit_bytes = RAM_LIMIT_BYTES
    get = images if callable(images) else images.__getitem__
    height, width = (side // autoencoder.downsample for side in (tile or get(0).shape[-2:]))
    # the posterior's mean and log-variance where there is one and training samples it
    posterior = cfg.posterior_samples and autoencoder.has_posterior
    channels = autoencoder.latent_channels * (2 if posterior else 1)
    shape = (count, cfg.augment_variants, channels, height, width)
    on_disk = folder is not None and int(np.prod(shape)) * 2 > ram_limit_bytes
    if on_disk:
        folder.mkdir(parents=True, exist_ok=True)
        file, done = folder / f"latents-{key}.npy", folder / f"latents-{key}.done"
        if file.is_file() and done.is_file():  # a finished cache from an earlier (resumed) run
            return LatentCache(np.load(file, mmap_mode="r")[:, : int(done.read_text())], on_disk=True, posterior=posterior)
        store: np.ndarray | torch.Tensor = np.lib.format.open_memmap(file, mode="w+", dtype=np.float16, shape=shape)
    else:
        store = torch.empty(shape, dtype=torch.float16)
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:  # one view at a time in channels-last layout: ~1.5x faster on a CPU (see model.py)
        autoencoder.to(memory_format=torch.channels_last)
    layout = torch.channels_last if on_cpu else torch.contiguous_format
    began, views_done = time.monotonic(), 0
    for view in range(cfg.augment_variants):
        for index in range(count):
            image = augmented_view(get(index), cfg, index, view, tile).to(device)
            pixels = image[None].contiguous(memory_format=layout)
            latent = torch.cat(autoencoder.encode_posterior(pixels), dim=1)[0] if posterior else autoencoder.encode(pixels)[0]
            latent = latent.float().cpu().contiguous().to(torch.float16)
            store[index, view] = latent.numpy() if on_disk else latent
            if progress is not None:
                progress(view * count + index + 1, count * cfg.augment_variants)
        views_done = view + 1
        per_view = (time.monotonic() - began) / views_done
        if time_limit_s is not None and (views_done + 1) * per_view > time_limit_s:
            break
    if on_disk:
        store.flush()
        done.write_text(f"{views_done}\n")
        return LatentCache(np.load(file, mmap_mode="r")[:, :views_done], on_disk=True, posterior=posterior)
    return LatentCache(store[:, :views_done], on_disk=False, posterior=posterior)
