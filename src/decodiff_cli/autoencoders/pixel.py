"""The weight-free backend: lossless 8x8 space-to-depth.

Each 8x8 RGB block becomes one 192-channel latent pixel, so the whole tool runs with no
download at all and the round trip image -> latent -> image is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from decodiff_cli.autoencoders.base import Autoencoder


class PixelAutoencoder(Autoencoder):
    kind = "pixel"

    def __init__(self, downsample: int = 8) -> None:
        super().__init__()
        self.downsample = downsample
        self.latent_channels = 3 * downsample * downsample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.downsample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.downsample)

    def architecture(self) -> dict[str, Any]:
        return {"downsample": self.downsample}
