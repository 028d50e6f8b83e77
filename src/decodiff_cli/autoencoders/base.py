"""The one small interface every autoencoder backend implements.

Images are float tensors (N, 3, H, W) in [-1, 1]; latents are (N, C, H/f, W/f) *raw*
(unscaled) latents. Latent scaling to unit variance happens outside, in
``latents.LatentScaler``, so that it can be fitted on the training set and saved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class AutoencoderUnavailable(ValueError):
    """The autoencoder could not be loaded (offline hub, bad folder, bad weights)."""


class Autoencoder(nn.Module):
    kind: str = ""
    latent_channels: int = 0
    downsample: int = 8

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # (N,3,H,W) -> (N,C,h,w)
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (N,C,h,w) -> (N,3,H,W)
        raise NotImplementedError

    def architecture(self) -> dict[str, Any]:
        """Plain data that, with ``state_dict()``, rebuilds this network offline."""
        raise NotImplementedError
