"""Frozen autoencoders behind one interface (see ``base.Autoencoder``).

The same spec string selects a backend everywhere: ``taef2`` (packaged, the default);
``pixel``; a folder with a ``*_encoder.pth`` / ``*_decoder.pth`` pair (TAESD family) or a
``.safetensors`` file with both halves; a local diffusers folder; or a hub id
(``madebyollin/taef2`` as one safetensors file, ``madebyollin/taesd``-like ids as
``AutoencoderTiny``, anything else as ``AutoencoderKL``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from decodiff_cli.autoencoders.base import Autoencoder, AutoencoderUnavailable
from decodiff_cli.config import AutoencoderConfig

__all__ = ["Autoencoder", "AutoencoderUnavailable", "load_autoencoder", "rebuild_autoencoder", "describe",
           "PACKAGED_TAEF2"]

# TAEF2 (MIT, madebyollin/taesd), shipped inside the package with its licence: 3 -> 32 channels, 8x.
PACKAGED_TAEF2 = Path(__file__).parent / "taef2" / "taef2.safetensors"
# Hub repositories that hold one TAESD-layout safetensors file rather than a diffusers folder.
HUB_SINGLE_FILES = {"madebyollin/taef2": "taef2.safetensors"}


def load_autoencoder(spec: str) -> Autoencoder:
    """Spec string -> a frozen, eval-mode autoencoder with pretrained weights."""
    from decodiff_cli.autoencoders.taesd_folder import TaesdFolderAutoencoder, is_taesd_folder

    if spec == "pixel":
        from decodiff_cli.autoencoders.pixel import PixelAutoencoder

        return PixelAutoencoder()
    if spec == "taef2":
        return TaesdFolderAutoencoder.from_file(PACKAGED_TAEF2)
    if spec in HUB_SINGLE_FILES:
        from decodiff_cli.autoencoders import hub

        return TaesdFolderAutoencoder.from_file(hub.download(spec, HUB_SINGLE_FILES[spec]))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return TaesdFolderAutoencoder.from_file(path)
    if path.is_dir():
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
        return _diffusers(kind, str(path), local=True)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise AutoencoderUnavailable(f"{spec}: no such autoencoder folder or .safetensors file")
    kind = "tiny" if "tae" in spec.lower().split("/")[-1] else "kl"
    return _diffusers(kind, spec)


def _diffusers(kind: str, spec: str, local: bool = False) -> Autoencoder:
    from decodiff_cli.autoencoders.diffusers_vae import DiffusersAutoencoder

    return DiffusersAutoencoder.from_pretrained(kind, spec, local=local)


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
