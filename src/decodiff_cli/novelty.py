"""The map's novelty term (beyond the paper): how far each place of the input latent is from
the nearest normal latent, at any position of any normal training image.

The correction says where the model would change the input; novelty says where the input
is unlike anything seen normal. A small dark hole in a textured surface can look plausible
to the denoiser (it changes it little) yet match no normal patch. Each latent vector is
first averaged with its 3x3 neighbours, so that a place is compared with its surroundings
and one noisy vector does not decide. Further windows (``MapConfig.novelty_windows``, e.g.
1: the vector alone, which a hole of one latent pixel does not dilute) are matched on their
own, against their part of the same bank vectors. Distances are in units of their 99th
percentile on normal training images (each compared with the other images), like the
feature term.

The nearest normal vector may come from anywhere, so a dark hole next to a dark normal
spot elsewhere looks normal. ``MapConfig.novelty_positions`` adds a place-bound view: each
single latent vector against the normal mean and covariance at its own position
(``position_statistics``), which sees a one-pixel hole where the 3x3 average does not.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.nn import functional as F

DISTANCES_PER_CHUNK = 2**24  # query x bank distances computed at once: 64 MiB of floats
BANK_BLOCK_CPU = 512  # bank vectors per distance block on a CPU: 1,024 queries x 512 = 2 MiB
POOL_PER_BANK_VECTOR = 8  # candidates drawn per bank vector before the covering selection
COVER_ROUNDS = 4


def neighbourhood(z: torch.Tensor, windows: Sequence[int] = (3,)) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, C * len(windows), h, w): each vector averaged over its
    k x k neighbours for each odd window k (edges replicated), concatenated."""
    z = z.float()
    return torch.cat([z if k == 1 else F.avg_pool2d(F.pad(z, (k // 2,) * 4, mode="replicate"), k, stride=1)
                      for k in windows], dim=1)


# The normal spread at each position: its own covariance across the training images, shrunk a
# quarter towards the covariance pooled over positions (a few hundred images estimate it
# noisily) and then half towards the same variance in every direction, so that an unusual
# direction and a large deviation both count (docs/results.md, "The covariance at each position").
POSITION_POOLING = 0.25
POSITION_ISOTROPY = 0.5


def position_statistics(latents_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The normal images ``images`` (N,) ids, read in groups through ``latents_of`` ->
    (C + 1, C, h, w): the mean latent at each position, then the position's whitening matrix
    W (C, C), for which W (z - mean) has unit covariance under the normal spread there
    (its covariance shrunk by POSITION_POOLING and POSITION_ISOTROPY)."""
    total = outer = None
    for ids in images.split(64):
        z = latents_of(ids).double()
        shape = z.shape[1:]
        z = z.flatten(2)  # (n, C, positions)
        total = z.sum(dim=0) if total is None else total + z.sum(dim=0)
        products = torch.einsum("ncp,ndp->pcd", z, z)
        outer = products if outer is None else outer + products
    c, h, w = shape
    mean = total / len(images)
    covariance = outer / len(images) - torch.einsum("cp,dp->pcd", mean, mean)  # (positions, C, C)
    pooled = covariance.mean(dim=0)
    level = max(float(torch.diagonal(pooled).mean()), 1e-6)
    spread = ((1 - POSITION_ISOTROPY) * ((1 - POSITION_POOLING) * covariance + POSITION_POOLING * pooled)
              + POSITION_ISOTROPY * level * torch.eye(c, dtype=covariance.dtype))
    whitening = torch.linalg.inv(torch.linalg.cholesky(spread))  # W spread W^T = I
    whitening = whitening.reshape(h, w, c, c).permute(2, 3, 0, 1)
    return torch.cat([mean.reshape(1, c, h, w), whitening]).float()


def position_distance(z: torch.Tensor, statistics: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, h, w): each vector's root mean square deviation from the
    normal mean at its position, whitened by the normal spread there (``position_statistics``).
    ``mean`` (N, C, h, w), when given, replaces the stored mean (a normal image left out of it)."""
    if tuple(z.shape[1:]) != tuple(statistics.shape[1:]) or len(statistics) != z.shape[1] + 1:
        raise ValueError(f"the normal position statistics are for {tuple(statistics.shape[1:])} latents, "
                         f"these are {tuple(z.shape[1:])}")
    centre = statistics[0] if mean is None else mean
    white = torch.einsum("ijhw,njhw->nihw", statistics[1:], z.float() - centre)
    return white.pow(2).mean(dim=1).sqrt()


def position_scale(latents: torch.Tensor, statistics: torch.Tensor, images: int) -> float:
    """The 99th percentile of ``position_distance`` over (n, C, h, w) normal latents that
    are among the ``images`` the statistics were measured on, each against the mean without
    itself (as ``novelty_scale`` leaves each image's own bank vectors out)."""
    mean = statistics[0]
    if images > 1:
        mean = (images * mean - latents.float()) / (images - 1)
    distances = position_distance(latents, statistics, mean)
    return max(float(torch.quantile(distances.flatten()[:2**24], 0.99)), 1e-6)


def _vectors(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def normal_bank(latents_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int,
                seed: int = 0, windows: Sequence[int] = (3,)) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal images ``images`` (N,) ids, read in groups through ``latents_of(ids) ->
    (n, C, h, w)`` (a cache may be larger than RAM) -> (bank (M, C * len(windows)), owner (M,)):
    at most ``size`` of their neighbourhood vectors that cover them (``covering``), and the
    id of the image each came from."""
    generator = torch.Generator().manual_seed(seed)
    pool, owner = _random_share(latents_of, images, POOL_PER_BANK_VECTOR * size, generator, windows)
    chosen = covering(pool, size, generator)
    return pool[chosen].contiguous(), owner[chosen]


def _random_share(latents_of, images: torch.Tensor, size: int, generator: torch.Generator,
                  windows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """At most about ``size`` neighbourhood vectors, an equal random share of each image."""
    vectors, owner = [], []
    for ids in images.split(64):
        z = neighbourhood(latents_of(ids), windows)
        places = z.shape[-2] * z.shape[-1]
        share = min(places, -(-size // len(images)))
        for image_id, image in zip(ids, z):
            keep = torch.randperm(places, generator=generator)[:share]
            vectors.append(_vectors(image[None])[keep])
            owner.append(torch.full((share,), int(image_id)))
    return torch.cat(vectors), torch.cat(owner)


def covering(pool: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The indices of at most ``size`` (M, C) ``pool`` vectors: half drawn at random, the
    other half added in COVER_ROUNDS rounds, each taking the vectors farthest from all
    chosen so far. A batched form of the greedy k-centre coreset (PatchCore): a random
    sample is dense where normal images are alike and misses their rare parts, which
    then look novel on normal test images (magnetic tiles, same weights: image AUROC
    .763 -> .813 with the map half and half, benchmarks/novelty_mix.py)."""
    if len(pool) <= size:
        return torch.arange(len(pool))
    chosen = torch.randperm(len(pool), generator=generator)[: max(1, size // 2)]
    farthest = _nearest(pool, pool[chosen])
    for round_ in range(COVER_ROUNDS):
        count = (size - len(chosen)) // (COVER_ROUNDS - round_)
        if count == 0:  # tiny banks
            continue
        farthest[chosen] = -1.0
        added = farthest.topk(count).indices
        chosen = torch.cat([chosen, added])
        if round_ + 1 < COVER_ROUNDS:
            farthest = torch.minimum(farthest, _nearest(pool, pool[added]))
    return chosen


def _nearest(queries: torch.Tensor, bank: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, C) queries -> (Q,) the distance of each to the nearest (M, C) bank vector, not
    counting those where ``excluded`` (M,) bool is set. Squared distances as
    |b|^2 - 2 q.b (one matrix product per block), the minimum per block, |q|^2 and the root
    only for the minima. On a CPU the blocks are small enough to stay in cache (4-5x faster
    than whole-bank ``cdist`` on one thread, docs/results.md)."""
    bank_block = len(bank) if queries.is_cuda else min(len(bank), BANK_BLOCK_CPU)
    squares = bank.pow(2).sum(dim=1)
    rows = []
    for chunk in queries.split(max(1, DISTANCES_PER_CHUNK // bank_block)):
        best = torch.full((len(chunk),), float("inf"), device=chunk.device)
        for start in range(0, len(bank), bank_block):
            stop = start + bank_block
            d = torch.addmm(squares[None, start:stop], chunk, bank[start:stop].t(), alpha=-2)
            if excluded is not None:
                d[:, excluded[start:stop]] = float("inf")
            best = torch.minimum(best, d.amin(dim=1))
        rows.append((best + chunk.pow(2).sum(dim=1)).clamp_min(0).sqrt())
    return torch.cat(rows)


def nearest_distance(z: torch.Tensor, bank: torch.Tensor, exclude: torch.Tensor | None = None,
                     windows: Sequence[int] = (3,)) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, len(windows), h, w): per window, the distance of each
    place's vector to the nearest bank vector (their parts for that window, novelty.neighbourhood).
    ``exclude`` (N, M) bool: bank vectors image n may not match."""
    h, w = z.shape[-2:]
    c = z.shape[1]
    bank = bank.to(z.device, torch.float32)
    parts = [bank[:, k * c:(k + 1) * c].contiguous() for k in range(len(windows))]
    rows = []
    for i, image in enumerate(neighbourhood(z, windows)):
        vectors, excluded = _vectors(image[None]), None if exclude is None else exclude[i].to(z.device)
        rows.append(torch.stack([_nearest(vectors[:, k * c:(k + 1) * c].contiguous(), part, excluded).view(h, w)
                                 for k, part in enumerate(parts)]))
    return torch.stack(rows)


def novelty_scale(latents: torch.Tensor, ids: torch.Tensor, bank: torch.Tensor, owner: torch.Tensor,
                  windows: Sequence[int] = (3,)) -> float | list[float]:
    """The 99th percentile of the nearest distance of (n, C, h, w) normal latents, of the
    images ``ids`` (n,), each matched only against the bank vectors of other images: one
    number, or one per window when there are several."""
    distances = nearest_distance(latents, bank, exclude=owner[None, :] == ids[:, None], windows=windows)
    scales = [max(float(torch.quantile(d.flatten(), 0.99)), 1e-6) for d in distances.transpose(0, 1)]
    return scales[0] if len(scales) == 1 else scales
