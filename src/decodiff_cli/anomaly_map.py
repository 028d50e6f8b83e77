"""Discrepancies between an input and its correction -> anomaly map (paper Eq. 15).

Pixel discrepancy compares the *decoded* correction with the *decoded* input (not the
input image itself), so that the autoencoder's own reconstruction error cancels out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from decodiff_cli.config import COMBINATIONS, PIXEL_SCALES, MapConfig


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) maps, reflect padding, radius 3 sigma."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    h, w = maps.shape[-2:]
    pad_h, pad_w = min(radius, h - 1), min(radius, w - 1)
    out = maps

    def taps(pad: int) -> torch.Tensor:  # on maps smaller than the radius: renormalised, so constants stay constant
        k = kernel[radius - pad : radius + pad + 1]
        return k / k.sum()

    if pad_w > 0:
        out = F.conv2d(F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect"), taps(pad_w).view(1, 1, 1, -1))
    if pad_h > 0:
        out = F.conv2d(F.pad(out, (0, 0, pad_h, pad_h), mode="reflect"), taps(pad_h).view(1, 1, -1, 1))
    return out


def pixel_discrepancy(corrected: torch.Tensor, reconstructed: torch.Tensor, clip: float, sigma: float,
                      scale: str = "unit") -> torch.Tensor:
    """|D(z0_hat) - D(z0)|, max over RGB, clipped and blurred: (N,3,H,W) -> (N,1,H,W). ``scale``
    "decoder": on the decoder's own [-1, 1] scale (the paper's); "unit": halved to [0, 1] units."""
    if scale not in PIXEL_SCALES:
        raise ValueError(f"unknown pixel scale {scale!r}; choose one of {', '.join(PIXEL_SCALES)}")
    diff = (corrected - reconstructed).abs().amax(dim=1, keepdim=True)
    if scale == "unit":
        diff = diff / 2
    return gaussian_blur(diff.clamp(max=clip) / clip, sigma)


def latent_difference(z0_hat: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """|z0_hat - z0| mean over channels: (N, C, h, w) -> (N, 1, h, w), latent resolution."""
    return (z0_hat - z0).abs().mean(dim=1, keepdim=True)


def normal_reference(differences: torch.Tensor) -> torch.Tensor:
    """Per-position mean and spread of the latent difference over (N >= 2) normal images:
    (N, 1, h, w) -> (2, h, w). Blurred a little, because a few dozen images give noisy
    per-position statistics."""
    if len(differences) < 2:
        raise ValueError("a normal reference needs at least 2 images")
    mean = gaussian_blur(differences.mean(dim=0, keepdim=True), 1.0)
    spread = gaussian_blur(differences.std(dim=0, keepdim=True), 1.0)
    return torch.cat([mean, spread])[:, 0]


def alignment(latents: torch.Tensor) -> float:
    """How well positions correspond across (N, C, h, w) latents of one class: the spread
    across images at a fixed position, relative to the spread over all images and
    positions, averaged over channels. Aligned objects score well below 1; textures and
    parts at random positions or rotations score about 1."""
    per_position = latents.std(dim=0).mean(dim=(1, 2))
    overall = latents.transpose(0, 1).flatten(1).std(dim=1)
    return float((per_position / overall.clamp_min(1e-8)).mean())


def shift_images(images: torch.Tensor, d: int) -> torch.Tensor:
    """(N, C, H, W) content moved d pixels down and right (up and left when negative), the
    uncovered border filled by replicating the edge."""
    h, w = images.shape[-2:]
    p = abs(d)
    padded = F.pad(images, (p, p, p, p), mode="replicate")
    return padded[..., p - d : p - d + h, p - d : p - d + w]


def identity_reference(cfg: MapConfig, size: tuple[int, int]) -> torch.Tensor:
    """(2, h, w): a reference under which the z-score map is exactly the paper's map (mean 0,
    a constant spread s with 2 * s * reference_clip = latent_clip), for the classes of a
    model whose other classes use their own statistics."""
    spread = cfg.latent_clip / (2 * cfg.reference_clip)
    return torch.stack([torch.zeros(size), torch.full(size, spread)])


def latent_discrepancy(z0_hat: torch.Tensor, z0: torch.Tensor, clip: float, sigma: float, size: tuple[int, int],
                       reference: torch.Tensor | None = None) -> torch.Tensor:
    """|z0_hat - z0| mean over channels, clipped, blurred, upsampled to image size. With a
    (N, 2, h, w) reference, first a z-score against normal images; the spread is floored
    at its mean, so that places that never change on normal images do not explode."""
    diff = latent_difference(z0_hat, z0)
    if reference is not None:
        mean, spread = reference[:, :1], reference[:, 1:]
        diff = (diff - mean) / (spread + spread.mean(dim=(2, 3), keepdim=True) + 1e-6)
    diff = gaussian_blur(diff.clamp(0, clip) / clip, sigma)
    return F.interpolate(diff, size=size, mode="bilinear", align_corners=False)


def feature_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| mean over channels, for one level of decoder features: (N, C, h, w) -> (N, 1, h, w)."""
    return (a.float() - b.float()).abs().mean(dim=1, keepdim=True)


def feature_scales(levels: list[torch.Tensor]) -> list[float]:
    """Per level, the 99th percentile of the feature difference over normal images: the
    unit of the feature term, so that levels of different magnitude weigh alike."""
    return [max(float(torch.quantile(level.flatten()[:2**24], 0.99)), 1e-6) for level in levels]


def feature_discrepancy(levels: list[torch.Tensor], scales: torch.Tensor, clip: float, size: tuple[int, int]) -> torch.Tensor:
    """Feature differences in units of their (N, levels) normal scales, clipped, upsampled
    to image size and averaged over levels: (N, 1, H, W) in [0, 1]."""
    if len(levels) != scales.shape[1]:
        raise ValueError(f"the decoder gave {len(levels)} feature levels, the stored scales are for {scales.shape[1]}")
    terms = [F.interpolate((level / scales[:, i, None, None, None]).clamp(0, clip) / clip, size=size,
                           mode="bilinear", align_corners=False) for i, level in enumerate(levels)]
    return torch.stack(terms).mean(dim=0)


# The per-position view (MapConfig.novelty_positions) is added at half weight and not
# blurred: sharp enough for one-latent-pixel holes, light enough not to light up the normal
# parts of large defects (docs/results.md, "The covariance at each position").
POSITIONS_WEIGHT = 0.5


def _beyond_normal(distances: torch.Tensor, clip: float) -> torch.Tensor:
    """What (N, k, h, w) distances in normal units have beyond 1 (where 1% of normal places reach), in [0, 1]."""
    return ((distances - 1) / (clip - 1)).clamp(0, 1)


def novelty_discrepancy(distances: torch.Tensor, clip: float, sigma: float, size: tuple[int, int],
                        positions: bool = False) -> torch.Tensor:
    """(N, windows [+ 1], h, w) nearest-normal distances in units of their normal scale -> (N, 1, H, W)
    in [0, 1]: the first window's clipped, plus what each further window has beyond the normal
    range, so that normal places keep the first window's value; blurred like the latent term.
    With ``positions`` the last channel is the distance from the normal latent at each place:
    what it has beyond the normal range is added after the blur, unblurred, with
    POSITIONS_WEIGHT. Upsampled to image size."""
    windows = distances[:, :-1] if positions else distances
    term = windows[:, :1].clamp(0, clip) / clip
    if windows.shape[1] > 1:
        term = (term + _beyond_normal(windows[:, 1:], clip).sum(dim=1, keepdim=True)).clamp(max=1)
    term = gaussian_blur(term, sigma)
    if positions:
        term = (term + POSITIONS_WEIGHT * _beyond_normal(distances[:, -1:], clip)).clamp(max=1)
    return F.interpolate(term, size=size, mode="bilinear", align_corners=False)


def combine(terms: list[torch.Tensor], how: str) -> torch.Tensor:
    """The map's terms (pixel, latent, [features]) -> one map: their arithmetic or geometric mean."""
    if how == "geometric":
        return torch.stack(terms).clamp(min=0).prod(dim=0) ** (1 / len(terms))
    if how in ("arithmetic", "pixel", "latent"):  # one-term maps arrive here with that term alone
        return torch.stack(terms).mean(dim=0)
    raise ValueError(f"unknown map combination {how!r}; choose one of {', '.join(COMBINATIONS)}")


@dataclass
class MapInputs:
    """What one batch offers the map. The decoded images are needed by the pixel term only;
    the (N, 2, h, w) normal reference by the latent term when the map has one; the per-level
    feature differences and their (N, levels) scales by the feature term; the (N, windows [+ 1], h, w)
    nearest-normal distances (and the per-position one), in units of their normal scale, by the novelty term."""

    z0: torch.Tensor  # (N, C, h, w) the input's latent
    z0_hat: torch.Tensor  # its correction
    size: tuple[int, int]  # (H, W) of the map
    reconstructed: torch.Tensor | None = None  # (N, 3, H, W) D(z0)
    corrected: torch.Tensor | None = None  # D(z0_hat)
    reference: torch.Tensor | None = None
    features: list[torch.Tensor] | None = None
    feature_scales: torch.Tensor | None = None
    novelty: torch.Tensor | None = None


def _pixel_term(x: MapInputs, cfg: MapConfig) -> torch.Tensor:
    return pixel_discrepancy(x.corrected.float(), x.reconstructed.float(), cfg.pixel_clip, cfg.pixel_sigma, cfg.pixel_scale)


def _latent_term(x: MapInputs, cfg: MapConfig) -> torch.Tensor:
    reference = None if cfg.reference == "none" else x.reference  # "none": the paper's map, whatever is handed
    if cfg.reference != "none" and reference is None:
        raise ValueError(f"map reference {cfg.reference!r} needs the normal statistics stored at fit time")
    clip = cfg.latent_clip if reference is None else cfg.reference_clip
    return latent_discrepancy(x.z0_hat.float(), x.z0.float(), clip, cfg.latent_sigma, x.size, reference)


def _feature_term(x: MapInputs, cfg: MapConfig) -> torch.Tensor:
    if x.features is None or x.feature_scales is None:
        raise ValueError("the map's feature term needs the decoder's features and their scales from fit time")
    return feature_discrepancy(x.features, x.feature_scales, cfg.feature_clip, x.size)


def _novelty_term(x: MapInputs, cfg: MapConfig) -> torch.Tensor:
    if x.novelty is None:
        raise ValueError("the map's novelty term needs the nearest-normal distances and the normal latents from fit time")
    return novelty_discrepancy(x.novelty, cfg.novelty_clip, cfg.latent_sigma, x.size, cfg.novelty_positions)


# The correction map's terms (MapConfig.correction_terms says which are in use): a new term
# is a function here and a name there.
TERMS = {"pixel": _pixel_term, "latent": _latent_term, "features": _feature_term}


def anomaly_maps(inputs: MapInputs, cfg: MapConfig) -> torch.Tensor:
    """(N, H, W) maps in [0, 1]: the mean (``cfg.combine``) of the correction terms, then,
    with ``cfg.novelty``, a weighted sum of that map and the novelty term."""
    cfg.validate()
    maps = combine([TERMS[name](inputs, cfg) for name in cfg.correction_terms()], cfg.combine)
    if cfg.novelty:
        maps = (1 - cfg.novelty_weight) * maps + cfg.novelty_weight * _novelty_term(inputs, cfg)
    return maps[:, 0].clamp(0, 1)


def image_scores(maps: torch.Tensor, top_fraction: float = 0.0) -> torch.Tensor:
    """(N, H, W) maps -> (N,) image scores: the mean of each map's highest ``top_fraction``
    of pixels (at least one); 0: the map's maximum (the paper's score)."""
    flat = maps.flatten(1)
    return flat.topk(max(1, int(top_fraction * flat.shape[1])), dim=1).values.mean(dim=1)
