"""The DeCo-Diff diffusion process in latent space (paper Eq. 7-14, docs/method.md 2, 3, 5).

Three pieces, each small enough to check against the paper line by line:
- ``alpha_bars``: the squared-cosine noise schedule, abar_t for t = 0..T-1.
- ``corrupt``: the training-time masked forward process and its target, the
  direction of deviation eps' (Eq. 11), so that z_t = z0 + sqrt(1 - abar_t) * eps'.
- ``correct``: test-time deviation correction, deterministic DDIM started from the
  *clean* latent of the test image (Eq. 13-14).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from decodiff_cli.config import PREDICTIONS

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> eps_theta


def alpha_bars(num_timesteps: int = 10, kind: str = "squaredcos_cap_v2") -> torch.Tensor:
    """abar_t = prod_{i<=t} (1 - beta_i), betas from f(s) = cos^2((s+0.008)/1.008 * pi/2)."""
    if kind != "squaredcos_cap_v2":
        raise ValueError(f"unknown noise schedule {kind!r}; only 'squaredcos_cap_v2' exists")

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in range(num_timesteps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), dim=0).float()


# ----------------------------------------------------------------------------- training


@dataclass
class Corruption:
    z_t: torch.Tensor  # (N, C, H, W) the masked, partly noised latent fed to the model
    target: torch.Tensor  # (N, C, H, W) eps', the direction of deviation (Eq. 11)
    kept: torch.Tensor  # (N, 1, H, W) m: 1 where the latent was kept clean
    patch_size: int


def sample_patch_size(sizes: Sequence[int], probs: Sequence[float], generator: torch.Generator | None = None) -> int:
    """One patch size per batch (docs/method.md 3.2)."""
    weights = torch.tensor(probs, dtype=torch.float64)
    return int(sizes[int(torch.multinomial(weights, 1, generator=generator))])


def _patch_grid_to_latent(grid: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """(N, gh, gw) per-patch values -> (N, 1, H, W); a partial last patch is cropped, so
    patch sizes that do not divide the latent side still work."""
    full = grid.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return full[:, None, :height, :width]


def corrupt(
    z0: torch.Tensor,
    t: torch.Tensor,
    abar: torch.Tensor,
    patch_size: int,
    mask_ratio_max: float = 0.7,
    shuffle_ratio_max: float = 0.3,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    exact_mask: bool = False,
    source_generator: torch.Generator | None = None,
) -> Corruption:
    """The masked forward process (docs/method.md 3.3-3.6).

    z0: (N, C, H, W) clean latents; t: (N,) integer timesteps; abar: (T,) schedule.
    ``generator``: one for the whole batch, or one per sample (each sample's mask and noise
    then come from its own); the patch-shuffling sources, which mix samples, come from
    ``source_generator`` (default: the one generator).
    ``exact_mask``: exactly floor(N (1 - r)) of the N patches stay clean, not each with
    probability 1 - r.
    """
    n, c, h, w = z0.shape
    gh, gw = math.ceil(h / patch_size), math.ceil(w / patch_size)
    dev = z0.device
    per_sample = isinstance(generator, (list, tuple))
    if per_sample and len(generator) != n:
        raise ValueError(f"{len(generator)} generators for {n} samples")

    def draw(sampler, *shape: int) -> torch.Tensor:  # (n, *shape) on the CPU
        if per_sample:
            return torch.stack([sampler(shape, g) for g in generator])
        return sampler((n, *shape), generator)

    def uniform(*shape: int) -> torch.Tensor:
        return draw(lambda size, g: torch.rand(*size, generator=g), *shape).to(dev)

    # m: a per-sample ratio r ~ U(0, mask_ratio_max) of the patches is noised.
    ratio = uniform(1, 1) * mask_ratio_max
    scores = uniform(gh, gw)
    if exact_mask:  # the floor(N (1 - r)) patches with the lowest scores stay clean
        keep = torch.floor(gh * gw * (1 - ratio.view(n, 1)))
        rank = scores.view(n, -1).argsort(dim=1).argsort(dim=1)
        kept = (rank < keep).view(n, gh, gw).to(z0.dtype)
    else:
        kept = (scores >= ratio).to(z0.dtype)
    kept = _patch_grid_to_latent(kept, patch_size, h, w)

    # n: Gaussian, except on a per-sample fraction U(0, shuffle_ratio_max) of the patches,
    # where it is a latent patch from another image or position of the batch (structured,
    # realistic "anomalies"). Patch sources are drawn on the patch grid.
    noise = draw(lambda size, g: torch.randn(*size, generator=g), c, h, w).to(dev, z0.dtype)
    shuffle_ratio = uniform(1, 1) * shuffle_ratio_max
    shuffled = _patch_grid_to_latent((uniform(gh, gw) < shuffle_ratio).to(z0.dtype), patch_size, h, w)
    if shuffled.any():
        sources = source_generator if per_sample else generator
        noise = shuffled * _shuffle_patches(z0, patch_size, sources) + (1 - shuffled) * noise

    a = abar.to(dev, z0.dtype)[t].view(n, 1, 1, 1)
    sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
    z_t = kept * z0 + (1 - kept) * (sqrt_a * z0 + sqrt_1ma * noise)  # Eq. 7-9
    target = (1 - kept) * (noise - (1 - sqrt_a) / sqrt_1ma * z0)  # Eq. 11
    return Corruption(z_t=z_t, target=target, kept=kept, patch_size=patch_size)


def _shuffle_patches(z0: torch.Tensor, patch: int, generator: torch.Generator | None) -> torch.Tensor:
    """Every PxP patch replaced by a random patch of the batch (any image, any position)."""
    n, c, h, w = z0.shape
    ph, pw = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
    padded = F.pad(z0, (0, pw - w, 0, ph - h), mode="replicate") if (ph, pw) != (h, w) else z0
    patches = F.unfold(padded, kernel_size=patch, stride=patch)  # (N, C*P*P, L)
    per_image = patches.shape[-1]
    flat = patches.permute(0, 2, 1).reshape(n * per_image, -1)  # (N*L, C*P*P)
    source = torch.randint(0, n * per_image, (n * per_image,), generator=generator).to(z0.device)
    picked = flat[source].reshape(n, per_image, -1).permute(0, 2, 1)
    return F.fold(picked, (ph, pw), kernel_size=patch, stride=patch)[:, :, :h, :w]


def as_deviation(output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
                 prediction: str) -> torch.Tensor:
    """The network's output as eps' (DenoiserConfig.prediction): a predicted clean latent
    x0 becomes (z_t - x0) / sqrt(1 - abar_t), so that z_t - sqrt(1 - abar_t) eps' = x0."""
    if prediction == "deviation":
        return output
    if prediction != "clean":
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    a = abar.to(z_t.device, torch.float32)[t].view(-1, 1, 1, 1)
    return (z_t - output) / (1 - a).sqrt()


def loss_weights(t: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """(N, 1, 1, 1) weights that turn the squared error of eps' into that of the network's own
    output: 1 for "deviation", 1 - abar_t for "clean" (|x0 - z0|^2 = (1 - abar_t) |eps - eps'|^2)."""
    if prediction == "deviation":
        return torch.ones(len(t), 1, 1, 1, device=t.device)
    return (1 - abar.to(t.device, torch.float32)[t]).view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------- inference


@torch.no_grad()
def correct(
    denoiser: Denoiser,
    z0: torch.Tensor,
    abar: torch.Tensor,
    timesteps: Sequence[int],
    strategy: str = "z_{t-1}",
) -> torch.Tensor:
    """Deviation correction (Eq. 13-14): deterministic DDIM from the clean latent.

    Normal regions get eps_theta ~ 0 and stay as they are; anomalous regions move towards
    the normal manifold. Returns z0_hat after the last call.
    """
    if strategy not in ("z_{t-1}", "z0"):
        raise ValueError(f"unknown correction strategy {strategy!r}; use 'z_{{t-1}}' or 'z0'")
    abar = abar.to(z0.device, torch.float32)
    z = z0
    z0_hat = z0
    for i, t in enumerate(timesteps):
        t_batch = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        eps = denoiser(z, t_batch).to(z.dtype)
        z0_hat = z - (1 - abar[t]).sqrt() * eps
        if i + 1 == len(timesteps):
            break
        if strategy == "z0":
            z = z0_hat
        else:
            z = z0_hat + (1 - abar[timesteps[i + 1]]).sqrt() * eps
    return z0_hat
