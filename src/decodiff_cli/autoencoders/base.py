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

    def decode_unclamped(self, latents: torch.Tensor) -> torch.Tensor:
        """``decode`` before any clamp to [-1, 1]: the decoder's own output, which the
        paper's pixel term compares (docs/method.md 6). Backends that never clamp: ``decode``."""
        return self.decode(latents)

    @property
    def has_posterior(self) -> bool:
        """Whether the encoder gives a Gaussian posterior (``encode_posterior``)."""
        return False

    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of the encoder's Gaussian posterior, each (N,C,h,w); ``encode``
        gives the mean."""
        raise NotImplementedError(f"the {self.kind!r} autoencoder has no posterior")

    def architecture(self) -> dict[str, Any]:
        """Plain data that, with ``state_dict()``, rebuilds this network offline."""
        raise NotImplementedError

    def feature_stages(self) -> list[nn.Module]:
        """Decoder modules whose *inputs* are the feature maps the map's feature term
        compares (one per resolution: the upsampling steps); [] when there are none."""
        return []

    def decode_with_features(self, latents: torch.Tensor, clamp: bool = True, image: bool = True,
                             levels: int | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """``decode`` (``decode_unclamped`` without ``clamp``) that also returns the decoder's
        first ``levels`` feature maps (None: all), coarse to fine. Without ``image`` the
        decoder stops at the last of them and the image is None: the finer layers, most of
        a decoder's work, are skipped."""
        stages = self.feature_stages()[:levels]
        found: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple) -> None:
            if len(found) < len(stages):
                found.append(args[0])
            if not image and len(found) == len(stages):
                raise _Enough

        hooks = [stage.register_forward_pre_hook(grab) for stage in stages]
        try:
            decoded = self.decode(latents) if clamp else self.decode_unclamped(latents)
        except _Enough:
            return None, found
        finally:
            for hook in hooks:
                hook.remove()
        return (decoded if image else None), found


class _Enough(Exception):
    """Raised inside the decoder once it has given every feature map asked for."""
