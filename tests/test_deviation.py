"""The diffusion process in latent space: schedule, masked forward process, correction."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from decodiff_cli.config import CorrectionConfig
from decodiff_cli.deviation import alpha_bars, as_deviation, corrupt, correct, loss_weights, sample_patch_size

# docs/method.md section 2, to 4 decimals.
ABAR = [0.9721, 0.8987, 0.7869, 0.6475, 0.4938, 0.3408, 0.2031, 0.0940, 0.0241, 0.0]
SQRT_1MA = [0.1671, 0.3183, 0.4616, 0.5937, 0.7114, 0.8119, 0.8927, 0.9518, 0.9879, 1.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- schedule


def test_alpha_bars_match_method_table():
    abar = alpha_bars(10)
    assert abar.shape == (10,)
    assert abar.dtype == torch.float32
    for t, (expected, expected_sqrt) in enumerate(zip(ABAR, SQRT_1MA)):
        assert round(float(abar[t]), 4) == expected, t
        assert round(math.sqrt(1 - float(abar[t])), 4) == expected_sqrt, t
    assert 0 < float(abar[-1]) < 1e-4  # "~0", but not exactly 0: 1 - abar is never > 1


def test_alpha_bars_decrease_and_match_the_formula_for_other_lengths():
    for steps in (5, 10, 100, 1000):
        abar = alpha_bars(steps).double()
        assert bool((abar[1:] < abar[:-1]).all())
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        prod = 1.0
        for i in range(steps):
            prod *= 1 - min(1 - f((i + 1) / steps) / f(i / steps), 0.999)
            assert abs(float(abar[i]) - prod) < 1e-6


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="linear"):
        alpha_bars(10, kind="linear")


# ------------------------------------------------------------------------ patch sizes


def test_sample_patch_size_follows_the_probabilities():
    sizes, probs = [1, 2, 4, 8, 16], [0.30, 0.25, 0.20, 0.15, 0.10]
    g = _gen(0)
    draws = 4000
    counts = {s: 0 for s in sizes}
    for _ in range(draws):
        counts[sample_patch_size(sizes, probs, g)] += 1
    chi2 = sum((counts[s] - draws * p) ** 2 / (draws * p) for s, p in zip(sizes, probs))
    assert chi2 < 18.47, counts  # 4 degrees of freedom, p = 0.001


def test_sample_patch_size_never_draws_zero_probability_and_is_seeded():
    g = _gen(1)
    got = {sample_patch_size([1, 3, 5], [0.5, 0.0, 0.5], g) for _ in range(300)}
    assert got == {1, 5}
    a = [sample_patch_size([1, 2, 4], [1, 1, 1], _gen(7)) for _ in range(5)]
    b = [sample_patch_size([1, 2, 4], [1, 1, 1], _gen(7)) for _ in range(5)]
    assert a == b


# ---------------------------------------------------------------------------- corrupt


def _kept_is_patchwise(kept: torch.Tensor, p: int) -> bool:
    """Constant within every PxP cell of the grid anchored at (0, 0) (last cells cropped)."""
    n, _, h, w = kept.shape
    for y0 in range(0, h, p):
        for x0 in range(0, w, p):
            cell = kept[:, :, y0 : y0 + p, x0 : x0 + p].reshape(n, -1)
            if not bool((cell == cell[:, :1]).all()):
                return False
    return True


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_corrupt_identity_and_target_zero_on_kept(patch):
    g = _gen(patch)
    abar = alpha_bars(10)
    z0 = torch.randn(12, 4, 16, 16, generator=g)
    t = torch.randint(0, 10, (12,), generator=g)
    out = corrupt(z0, t, abar, patch, generator=g)
    assert out.z_t.shape == z0.shape and out.target.shape == z0.shape
    assert out.kept.shape == (12, 1, 16, 16)
    assert out.patch_size == patch
    sqrt_1ma = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(out.z_t, z0 + sqrt_1ma * out.target, rtol=0, atol=2e-6)
    assert set(out.kept.unique().tolist()) <= {0.0, 1.0}
    kept = out.kept.expand_as(z0).bool()
    assert bool((out.target[kept] == 0).all())  # exactly zero, not merely small
    assert torch.equal(out.z_t[kept], z0[kept])  # clean patches are untouched
    assert bool((out.target[~kept] != 0).all())  # noised patches always move
    assert 0 < kept.float().mean() < 1
    assert _kept_is_patchwise(out.kept, patch)


def test_corrupt_identity_holds_in_float64_per_sample_timestep():
    g = _gen(3)
    abar = alpha_bars(10)
    z0 = torch.randn(10, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.arange(10)  # every timestep once, so a shared-t bug cannot pass
    out = corrupt(z0, t, abar, 2, generator=g)
    assert out.z_t.dtype == torch.float64
    sqrt_1ma = (1 - abar.double()[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(out.z_t, z0 + sqrt_1ma * out.target, rtol=0, atol=1e-6)


def test_corrupt_is_deterministic_for_a_seed():
    abar = alpha_bars(10)
    z0 = torch.randn(4, 4, 8, 8, generator=_gen(0))
    t = torch.tensor([0, 3, 6, 9])
    a = corrupt(z0, t, abar, 2, generator=_gen(11))
    b = corrupt(z0, t, abar, 2, generator=_gen(11))
    c = corrupt(z0, t, abar, 2, generator=_gen(12))
    assert torch.equal(a.z_t, b.z_t) and torch.equal(a.kept, b.kept) and torch.equal(a.target, b.target)
    assert not torch.equal(a.z_t, c.z_t)


@pytest.mark.parametrize("shape,patch", [((8, 8), 3), ((8, 8), 5), ((7, 9), 3), ((7, 9), 5), ((8, 8), 16), ((7, 9), 2)])
def test_corrupt_with_patch_sizes_that_do_not_tile(shape, patch):
    g = _gen(patch)
    abar = alpha_bars(10)
    h, w = shape
    z0 = torch.randn(6, 4, h, w, generator=g)
    t = torch.randint(0, 10, (6,), generator=g)
    out = corrupt(z0, t, abar, patch, shuffle_ratio_max=1.0, generator=g)
    assert out.z_t.shape == (6, 4, h, w)
    assert out.target.shape == (6, 4, h, w)
    assert out.kept.shape == (6, 1, h, w)
    sqrt_1ma = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(out.z_t, z0 + sqrt_1ma * out.target, rtol=0, atol=2e-6)
    assert bool((out.target * out.kept == 0).all())
    assert _kept_is_patchwise(out.kept, patch)
    assert bool(torch.isfinite(out.z_t).all())


def _noised_fractions(patch: int, side: int, n: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    z0 = torch.randn(n, 1, side, side, generator=g)
    out = corrupt(z0, torch.randint(0, 10, (n,), generator=g), alpha_bars(10), patch, generator=g)
    grid = out.kept[:, 0, ::patch, ::patch]  # one value per patch
    return 1 - grid.reshape(n, -1).mean(dim=1)


def test_mask_ratio_is_uniform_up_to_0_7():
    # 24x24 patches per sample: the realised noised fraction is close to the drawn ratio r.
    frac = _noised_fractions(patch=1, side=24, n=2000, seed=5)
    assert abs(float(frac.mean()) - 0.35) < 0.015
    assert float(frac.max()) < 0.78 and float(frac.max()) > 0.65
    assert float(frac.min()) < 0.03
    for q, expected in [(0.1, 0.07), (0.25, 0.175), (0.5, 0.35), (0.75, 0.525), (0.9, 0.63)]:
        assert abs(float(frac.quantile(q)) - expected) < 0.03, (q, float(frac.quantile(q)))


def test_mask_ratio_counts_patches_not_pixels():
    frac = _noised_fractions(patch=2, side=16, n=1500, seed=6)  # 8x8 = 64 patches each
    assert abs(float(frac.mean()) - 0.35) < 0.02
    assert float(frac.max()) < 0.95


def test_mask_ratio_max_is_honoured():
    g = _gen(8)
    z0 = torch.randn(400, 1, 16, 16, generator=g)
    t = torch.zeros(400, dtype=torch.long)
    none = corrupt(z0, t, alpha_bars(10), 1, mask_ratio_max=0.0, generator=g)
    assert bool((none.kept == 1).all()) and torch.equal(none.z_t, z0)
    half = corrupt(z0, t, alpha_bars(10), 1, mask_ratio_max=0.2, generator=g)
    assert abs(float(1 - half.kept.mean()) - 0.1) < 0.01


def _recover_noise(out, z0, abar, t) -> torch.Tensor:
    """n from eps' = n - (1 - sqrt(abar)) / sqrt(1 - abar) * z0 (valid on noised patches)."""
    a = abar.double()[t].view(-1, 1, 1, 1)
    return out.target + (1 - a.sqrt()) / (1 - a).sqrt() * z0


def test_gaussian_noise_without_shuffling_is_standard_normal():
    g = _gen(9)
    abar = alpha_bars(10)
    z0 = torch.randn(64, 4, 16, 16, generator=g, dtype=torch.float64) * 3 + 1
    t = torch.randint(0, 9, (64,), generator=g)
    out = corrupt(z0, t, abar, 2, shuffle_ratio_max=0.0, generator=g)
    noised = (out.kept == 0).expand_as(z0)
    n = _recover_noise(out, z0, abar, t)[noised]
    assert n.numel() > 10000
    assert abs(float(n.mean())) < 0.03
    assert abs(float(n.std()) - 1) < 0.03
    # independent of z0 (shuffled noise would correlate with it)
    assert abs(float(torch.corrcoef(torch.stack([n, z0[noised]]))[0, 1])) < 0.03


def _match_patches(noise: torch.Tensor, z0: torch.Tensor, noised: torch.Tensor, p: int):
    """For each noised PxP cell: the index of the image of the z0 window (any offset) it equals,
    or -1. Returns (image index of the cell, matched image index) pairs."""
    n, c, h, w = z0.shape
    windows = F.unfold(z0, kernel_size=p, stride=1)  # (N, C*P*P, L)
    per_image = windows.shape[-1]
    bank = windows.permute(0, 2, 1).reshape(n * per_image, -1)
    cells = F.unfold(noise, kernel_size=p, stride=p).permute(0, 2, 1)  # (N, Lp, C*P*P)
    is_noised = F.unfold(noised.double(), kernel_size=p, stride=p)[:, 0, :] > 0.5  # (N, Lp)
    out = []
    for i in range(n):
        for j in torch.nonzero(is_noised[i]).flatten().tolist():
            d = (bank - cells[i, j]).abs().amax(dim=1)
            k = int(d.argmin())
            out.append((i, k // per_image if float(d[k]) < 1e-9 else -1))
    return out


def test_patch_shuffling_puts_real_latent_patches_in_the_noise():
    g = _gen(10)
    abar = alpha_bars(10)
    p, n = 2, 48
    z0 = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 10, (n,), generator=g)
    out = corrupt(z0, t, abar, p, mask_ratio_max=0.999, shuffle_ratio_max=1.0, generator=g)
    noise = _recover_noise(out, z0, abar, t)
    pairs = _match_patches(noise, z0, out.kept[:, :1] == 0, p)
    assert len(pairs) > 300
    matched = [(i, k) for i, k in pairs if k >= 0]
    share = len(matched) / len(pairs)
    # per-sample shuffle fraction ~ U(0, 1): about half of the noised patches are real patches
    assert 0.35 < share < 0.65, share
    # taken from other images of the batch, not only from the same one
    other = sum(1 for i, k in matched if k != i) / len(matched)
    assert other > 0.8, other
    # the non-shuffled rest is Gaussian noise, which matches no latent window
    gaussian = [i for i, k in pairs if k < 0]
    assert len(gaussian) > 100


@pytest.mark.parametrize("shuffle_max,low,high", [(0.0, 0.0, 0.0), (0.3, 0.08, 0.22)])
def test_patch_shuffle_ratio(shuffle_max, low, high):
    g = _gen(11)
    abar = alpha_bars(10)
    p, n = 2, 48
    z0 = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 10, (n,), generator=g)
    out = corrupt(z0, t, abar, p, mask_ratio_max=0.999, shuffle_ratio_max=shuffle_max, generator=g)
    pairs = _match_patches(_recover_noise(out, z0, abar, t), z0, out.kept[:, :1] == 0, p)
    share = sum(1 for _, k in pairs if k >= 0) / len(pairs)
    assert low <= share <= high, share


# ---------------------------------------------------------------------------- correct


def test_oracle_denoiser_recovers_z0_in_one_step():
    g = _gen(12)
    abar = alpha_bars(10)
    z0 = torch.randn(6, 4, 8, 8, generator=g)
    for step in (0, 4, 8, 9):
        t = torch.full((6,), step, dtype=torch.long)
        out = corrupt(z0, t, abar, 2, generator=g)
        calls = []

        def oracle(z_t, tt, out=out):
            calls.append(tt.clone())
            assert torch.equal(z_t, out.z_t)
            return out.target

        for strategy in ("z_{t-1}", "z0"):
            calls.clear()
            z0_hat = correct(oracle, out.z_t, abar, [step], strategy)
            torch.testing.assert_close(z0_hat, z0, rtol=0, atol=1e-5)
            assert len(calls) == 1 and torch.equal(calls[0], t)


def test_oracle_that_knows_z0_recovers_it_for_any_schedule():
    g = _gen(13)
    abar = alpha_bars(10)
    z0 = torch.randn(3, 4, 8, 8, generator=g)
    z_in = z0 + 0.7 * torch.randn(z0.shape, generator=g)

    def oracle(z_t, t):
        return (z_t - z0) / (1 - abar[t]).sqrt().view(-1, 1, 1, 1)

    for strategy in ("z_{t-1}", "z0"):
        for steps in ([8], [8, 0], [8, 6, 4, 2, 0], [9, 5, 1]):
            torch.testing.assert_close(correct(oracle, z_in, abar, steps, strategy), z0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", ["z_{t-1}", "z0"])
@pytest.mark.parametrize("steps", [[8], [8, 0], [8, 6, 4, 2, 0], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
def test_zero_denoiser_leaves_latents_unchanged(strategy, steps):
    z0 = torch.randn(2, 4, 8, 8, generator=_gen(14))
    out = correct(lambda z, t: torch.zeros_like(z), z0, alpha_bars(10), steps, strategy)
    assert torch.equal(out, z0)


def _reference(denoiser, z0, abar, steps, strategy):
    """docs/method.md section 5, written out in float64 scalars."""
    z = z0.double()
    ab = abar.double()
    for i, t in enumerate(steps):
        eps = denoiser(z, torch.full((z.shape[0],), t)).double()
        z0_hat = z - math.sqrt(1 - float(ab[t])) * eps
        if i + 1 < len(steps):
            nxt = steps[i + 1]
            z = z0_hat if strategy == "z0" else z0_hat + math.sqrt(1 - float(ab[nxt])) * eps
    return z0_hat


def test_correct_matches_the_ddim_equations_and_strategies_differ():
    abar = alpha_bars(10)
    z0 = torch.randn(2, 4, 8, 8, generator=_gen(15))
    w = torch.randn(4, 4, generator=_gen(16)) * 0.3

    def eps_theta(z, t):  # non-trivial, depends on z and on t
        scale = (1 + t.to(z.dtype)).view(-1, 1, 1, 1) / 10
        return scale * torch.einsum("oc,nchw->nohw", w.to(z.dtype), z) + 0.05 * torch.tanh(z)

    steps = CorrectionConfig().timesteps()
    a = correct(eps_theta, z0, abar, steps, "z_{t-1}")
    b = correct(eps_theta, z0, abar, steps, "z0")
    torch.testing.assert_close(a.double(), _reference(eps_theta, z0, abar, steps, "z_{t-1}"), rtol=0, atol=1e-5)
    torch.testing.assert_close(b.double(), _reference(eps_theta, z0, abar, steps, "z0"), rtol=0, atol=1e-5)
    assert (a - b).abs().max() > 1e-2
    # with a single call both strategies are the same single DDIM step
    torch.testing.assert_close(correct(eps_theta, z0, abar, [8], "z0"), correct(eps_theta, z0, abar, [8], "z_{t-1}"))


def test_correct_calls_the_denoiser_at_each_timestep_in_order():
    seen = []

    def spy(z, t):
        seen.append(t.tolist())
        return 0.1 * z

    correct(spy, torch.ones(3, 2, 4, 4), alpha_bars(10), [8, 6, 4, 2, 0])
    assert seen == [[8] * 3, [6] * 3, [4] * 3, [2] * 3, [0] * 3]


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        correct(lambda z, t: z, torch.zeros(1, 1, 2, 2), alpha_bars(10), [8], "ddpm")


@pytest.mark.parametrize(
    "start,calls,expected",
    [(8, 5, [8, 6, 4, 2, 0]), (8, 1, [8]), (8, 2, [8, 0]), (8, 3, [8, 4, 0]), (8, 9, [8, 7, 6, 5, 4, 3, 2, 1, 0]),
     (4, 3, [4, 2, 0]), (9, 10, list(range(9, -1, -1))), (0, 1, [0]), (0, 3, [0])],
)
def test_correction_timesteps(start, calls, expected):
    assert CorrectionConfig(start_step=start, num_calls=calls).timesteps() == expected


def test_correction_timesteps_default_and_general_shape():
    assert CorrectionConfig().timesteps() == [8, 6, 4, 2, 0]
    for calls in range(1, 15):
        steps = CorrectionConfig(start_step=8, num_calls=calls).timesteps()
        assert steps[0] == 8
        assert calls == 1 or steps[-1] == 0
        assert all(a > b for a, b in zip(steps, steps[1:]))
        assert len(steps) == min(calls, 9)
    with pytest.raises(ValueError):
        CorrectionConfig(num_calls=0).timesteps()


def test_a_predicted_clean_latent_is_the_deviation_that_leads_to_it():
    abar = alpha_bars(10)
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 3, 8, 9])
    c = corrupt(z0, t, abar, 2, generator=g)
    a = abar[t].view(-1, 1, 1, 1)
    # the exact clean latent as output gives the exact target, for either parametrisation
    assert torch.allclose(as_deviation(z0, c.z_t, t, abar, "clean"), c.target, atol=1e-5)
    assert torch.equal(as_deviation(c.target, c.z_t, t, abar, "deviation"), c.target)
    # the clean prediction's loss is its own squared error: (1 - abar_t) |eps - eps'|^2
    guess = z0 + 0.1 * torch.randn(z0.shape, generator=g)
    eps_error = (as_deviation(guess, c.z_t, t, abar, "clean") - c.target) ** 2
    assert torch.allclose(eps_error * loss_weights(t, abar, "clean"), (guess - z0) ** 2, atol=1e-5)
    assert torch.equal(loss_weights(t, abar, "deviation"), torch.ones(4, 1, 1, 1))
    assert torch.allclose(c.z_t - (1 - a).sqrt() * as_deviation(guess, c.z_t, t, abar, "clean"), guess, atol=1e-5)
    with pytest.raises(ValueError, match="unknown prediction"):
        as_deviation(z0, c.z_t, t, abar, "noise")
