"""Raw autoencoder latents <-> the unit-scale latents the diffusion model works in.

The schedule assumes latents of roughly unit variance (SD's 0.18215 factor exists for
this). Different autoencoders need different factors, so by default we standardise the
latents with statistics of the training latents, and store them in the bundle.
"""

from __future__ import annotations

import torch

from decodiff_cli.config import LATENT_SCALINGS, LatentScaling

STANDARDISED = ("channel", "pooled")  # each channel's mean; its own spread, or one pooled spread


def fit_scaling(latents: torch.Tensor, kind: str = "channel", factor: float = 1.0) -> LatentScaling:
    """latents: (N, C, h, w) raw training latents."""
    if kind not in LATENT_SCALINGS:
        raise ValueError(f"unknown latent scaling {kind!r}; choose one of {', '.join(LATENT_SCALINGS)}")
    if kind not in STANDARDISED:
        return LatentScaling(kind=kind, factor=factor if kind == "factor" else 1.0)
    flat = latents.transpose(0, 1).reshape(latents.shape[1], -1).double()
    std = flat.std(dim=1).clamp(min=1e-6)  # a dead channel must not divide by zero
    if kind == "pooled":  # one spread, the root mean channel variance: weak channels are not amplified
        std = std.pow(2).mean().sqrt().expand_as(std)
    return LatentScaling(kind=kind, mean=flat.mean(dim=1).tolist(), std=std.tolist())


class LatentScaler:
    def __init__(self, cfg: LatentScaling) -> None:
        self.cfg = cfg
        if cfg.kind in STANDARDISED:
            self.shift = torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.scale = 1 / torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1)
        else:
            self.shift = torch.zeros(1, 1, 1, 1)
            self.scale = torch.full((1, 1, 1, 1), cfg.factor if cfg.kind == "factor" else 1.0)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift.to(raw)) * self.scale.to(raw)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale.to(z) + self.shift.to(z)
