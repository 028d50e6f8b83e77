"""The denoiser eps_theta(z_t, t[, class]): an attention UNet with timestep embedding.

We use diffusers' ``UNet2DModel``. The paper's sizes (docs/method.md 4) are channel
multipliers 1, 2, 4, two res-blocks per level and attention at all three levels, named
here by base width. ``tiny`` exists for tests and trains in seconds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from decodiff_cli.config import DenoiserConfig

# name -> (base width, res-blocks per level, attention per level, dropout)
# The UNet halves the latent twice (three levels): each side must be a multiple of this.
LATENT_MULTIPLE = 4
SIZES: dict[str, tuple[int, int, tuple[bool, bool, bool], float]] = {
    "tiny": (16, 1, (False, False, True), 0.0),
    "xs": (64, 2, (True, True, True), 0.1),
    "s": (128, 2, (True, True, True), 0.2),
    "m": (192, 2, (True, True, True), 0.4),
    "l": (256, 2, (True, True, True), 0.4),
    "xl": (320, 2, (True, True, True), 0.4),
}


def unet_kwargs(cfg: DenoiserConfig) -> dict[str, Any]:
    if cfg.size not in SIZES:
        raise ValueError(f"unknown model size {cfg.size!r}; choose one of {', '.join(SIZES)}")
    width, layers, attention, dropout = SIZES[cfg.size]
    if cfg.attention:
        if len(cfg.attention) != len(attention):
            raise ValueError(f"attention needs one flag per level ({len(attention)}), got {cfg.attention}")
        attention = tuple(bool(a) for a in cfg.attention)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    kwargs: dict[str, Any] = dict(
        sample_size=cfg.latent_shape if cfg.latent_height else cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=(width, 2 * width, 4 * width),
        layers_per_block=layers,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=min(64, width),
        norm_num_groups=min(32, width // 2),
        dropout=dropout,
    )
    if cfg.num_classes > 0:
        kwargs["num_class_embeds"] = cfg.num_classes
    return kwargs


class Denoiser(nn.Module):
    """Wraps the UNet so callers see eps = model(z_t, t, class_labels)."""

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        from diffusers import UNet2DModel  # heavy import, kept out of `decodiff --help`

        self.cfg = cfg
        self.unet = UNet2DModel(**unet_kwargs(cfg))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.num_classes > 0 and class_labels is None:
            raise ValueError("this model is class-conditional: a category is needed")
        labels = class_labels if self.cfg.num_classes > 0 else None
        return self.unet(z_t, t, class_labels=labels).sample


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
