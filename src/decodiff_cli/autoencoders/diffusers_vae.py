"""diffusers autoencoders: ``AutoencoderKL`` (the paper's SD-VAE) and ``AutoencoderTiny`` (TAESD).

Loaded from a hub id or a local diffusers folder; rebuilt offline from their config dict
and the state dict stored in a bundle.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from decodiff_cli.autoencoders.base import Autoencoder

CLASSES = {"kl": "AutoencoderKL", "tiny": "AutoencoderTiny"}


def _diffusers_class(kind: str):
    import diffusers

    return getattr(diffusers, CLASSES[kind])


class DiffusersAutoencoder(Autoencoder):
    def __init__(self, kind: str, vae: torch.nn.Module) -> None:
        super().__init__()
        self.kind = kind
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        blocks = len(config.block_out_channels) if kind == "kl" else len(config.encoder_block_out_channels)
        self.downsample = 2 ** (blocks - 1)

    @classmethod
    def from_pretrained(cls, kind: str, spec: str, local: bool = False) -> "DiffusersAutoencoder":
        """A local diffusers folder, or a hub id (from the local cache when the hub is unreachable)."""
        from huggingface_hub.utils import logging as hub_logging

        from decodiff_cli.autoencoders import hub

        hub_logging.set_verbosity_error()  # its own retry warnings would precede our one sentence
        online = local or hub.reachable()
        try:
            with warnings.catch_warnings():  # deprecation chatter between diffusers and the hub client
                warnings.simplefilter("ignore")
                vae = _diffusers_class(kind).from_pretrained(spec, local_files_only=not online)
        except Exception as err:  # offline and not cached, missing folder, bad files: one sentence
            raise hub.unavailable(spec, hub.reason(online, err)) from None
        return cls(kind, vae.float())

    @classmethod
    def from_architecture(cls, kind: str, architecture: dict[str, Any]) -> "DiffusersAutoencoder":
        return cls(kind, _diffusers_class(kind).from_config(architecture["config"]))

    def architecture(self) -> dict[str, Any]:
        return {"config": {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "kl":
            return self.vae.encode(images).latent_dist.mean  # the mean at test time (paper)
        return self.vae.encode(images).latents

    @property
    def has_posterior(self) -> bool:
        return self.kind == "kl"

    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind != "kl":
            return super().encode_posterior(images)
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.logvar

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_unclamped(latents).clamp(-1, 1)

    def decode_unclamped(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample

    def feature_stages(self) -> list[torch.nn.Module]:
        # AutoencoderKL upsamples with diffusers' Upsample2D, AutoencoderTiny with nn.Upsample.
        return [m for m in self.vae.decoder.modules()
                if isinstance(m, torch.nn.Upsample) or type(m).__name__ == "Upsample2D"]
