"""Frozen autoencoders behind one interface (see ``base.Autoencoder``).

The same spec string selects a backend everywhere: ``pixel``; a folder with a
``*_encoder.pth`` / ``*_decoder.pth`` pair (TAESD family, e.g. TAEF2); a local diffusers
folder; or a hub id (``madebyollin/taesd``-like ids load as ``AutoencoderTiny``, anything
else as ``AutoencoderKL``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from decodiff_cli.autoencoders.base import Autoencoder, AutoencoderUnavailable
from decodiff_cli.config import AutoencoderConfig

__all__ = ["Autoencoder", "AutoencoderUnavailable", "load_autoencoder", "rebuild_autoencoder", "describe"]


def load_autoencoder(spec: str) -> Autoencoder:
    """Spec string -> a frozen, eval-mode autoencoder with pretrained weights."""
    if spec == "pixel":
        from decodiff_cli.autoencoders.pixel import PixelAutoencoder

        return PixelAutoencoder()
    path = Path(spec).expanduser()
    if path.is_dir():
        from decodiff_cli.autoencoders.taesd_folder import TaesdFolderAutoencoder, is_taesd_folder

        if is_taesd_folder(path):
            return TaesdFolderAutoencoder.from_folder(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise AutoencoderUnavailable(
                f"{spec}: neither a *_encoder.pth / *_decoder.pth pair nor a diffusers folder (config.json)"
            )
        try:
            class_name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
        except (OSError, ValueError) as err:
            raise AutoencoderUnavailable(f"{config_file}: unreadable ({err})") from None
        kind = "tiny" if class_name == "AutoencoderTiny" else "kl"
        return _diffusers(kind, str(path))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise AutoencoderUnavailable(f"{spec}: no such autoencoder folder")
    kind = "tiny" if "tae" in spec.lower().split("/")[-1] else "kl"
    return _diffusers(kind, spec)


def _diffusers(kind: str, spec: str) -> Autoencoder:
    from decodiff_cli.autoencoders.diffusers_vae import DiffusersAutoencoder

    return DiffusersAutoencoder.from_pretrained(kind, spec)


def describe(autoencoder: Autoencoder, spec: str) -> AutoencoderConfig:
    """What a bundle stores to rebuild this autoencoder with no network."""
    return AutoencoderConfig(
        spec=spec,
        kind=autoencoder.kind,
        architecture=autoencoder.architecture(),
        latent_channels=autoencoder.latent_channels,
        downsample=autoencoder.downsample,
    )


def rebuild_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """An autoencoder of the stored architecture with *random* weights: load the state dict next."""
    arch: dict[str, Any] = cfg.architecture
    if cfg.kind == "pixel":
        from decodiff_cli.autoencoders.pixel import PixelAutoencoder

        return PixelAutoencoder(**arch)
    if cfg.kind == "taesd_folder":
        from decodiff_cli.autoencoders.taesd_folder import TaesdFolderAutoencoder

        return TaesdFolderAutoencoder.from_architecture(arch)
    if cfg.kind in ("kl", "tiny"):
        from decodiff_cli.autoencoders.diffusers_vae import DiffusersAutoencoder

        return DiffusersAutoencoder.from_architecture(cfg.kind, arch)
    raise ValueError(f"unknown autoencoder kind {cfg.kind!r} in the bundle")
