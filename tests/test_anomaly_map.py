"""Discrepancies -> anomaly map (paper Eq. 15, docs/method.md section 6)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from decodiff_cli.anomaly_map import (
    MapInputs,
    COMBINATIONS,
    anomaly_maps,
    combine,
    gaussian_blur,
    image_scores,
    latent_discrepancy,
    pixel_discrepancy,
)
from decodiff_cli.config import MapConfig


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_case(n=2, c=4, h=8, w=8, f=8, seed=0):
    g = _gen(seed)
    z0 = torch.randn(n, c, h, w, generator=g)
    z0_hat = z0 + 0.3 * torch.randn(n, c, h, w, generator=g)
    rec = torch.rand(n, 3, h * f, w * f, generator=g) * 2 - 1
    cor = (rec + 0.5 * torch.randn(rec.shape, generator=g)).clamp(-1, 1)
    return z0, z0_hat, rec, cor


# ------------------------------------------------------------------------ shape, range


@pytest.mark.parametrize("how", COMBINATIONS)
def test_maps_have_image_size_and_lie_in_unit_range(how):
    z0, z0_hat, rec, cor = _random_case(n=3, h=6, w=8)
    maps = anomaly_maps(MapInputs(z0, z0_hat, (48, 64), reconstructed=rec, corrected=cor), MapConfig(combine=how))
    assert maps.shape == (3, 48, 64)
    assert maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert float(maps.max()) > 0.1  # the random discrepancies are visible
    scores = image_scores(maps)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, maps.flatten(1).max(dim=1).values)


@pytest.mark.parametrize("how", COMBINATIONS)
def test_identical_inputs_give_an_all_zero_map(how):
    z0, _, rec, _ = _random_case()
    maps = anomaly_maps(MapInputs(z0, z0.clone(), (64, 64), reconstructed=rec, corrected=rec.clone()), MapConfig(combine=how))
    assert maps.shape == (2, 64, 64)
    assert bool((maps == 0).all())
    assert bool((image_scores(maps) == 0).all())


def test_the_image_score_is_the_maximum_or_the_mean_of_the_top_fraction():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, :5] = 1.0  # a line of five hot pixels
    maps[1, 3, 3] = 1.0  # one hot pixel
    assert image_scores(maps).tolist() == [1.0, 1.0]
    assert image_scores(maps, 0.05).tolist() == pytest.approx([1.0, 0.2])  # the top 5 pixels
    assert image_scores(maps, 0.001).tolist() == [1.0, 1.0]  # at least one pixel


def test_the_image_score_fraction_is_a_cpu_default_and_checked():
    from decodiff_cli.presets import build_config

    assert build_config("cpu", {}).anomaly_map.score_top_fraction == 0.01
    assert build_config("paper", {}).anomaly_map.score_top_fraction == 0.0
    assert build_config("cpu", {"score_top": 0.0}).anomaly_map.score_top_fraction == 0.0
    with pytest.raises(ValueError, match="--score-top must be at least 0 and below 1"):
        build_config("cpu", {"score_top": 1.0})


def test_the_correction_terms_follow_the_combination_and_the_pixel_switch():
    assert MapConfig(combine="geometric").correction_terms() == ["pixel", "latent"]
    assert MapConfig(combine="pixel").correction_terms() == ["pixel"]
    assert MapConfig(combine="latent").correction_terms() == ["latent"]
    assert MapConfig(combine="arithmetic", features=True).correction_terms() == ["pixel", "latent", "features"]
    assert MapConfig(combine="arithmetic", features=True, pixel=False).correction_terms() == ["latent", "features"]
    with pytest.raises(ValueError, match="--no-map-pixel"):
        MapConfig(combine="pixel", pixel=False).validate()
    z0, z0_hat, _, _ = _random_case()
    maps = anomaly_maps(MapInputs(z0, z0_hat, (64, 64)), MapConfig(combine="latent"))
    assert maps.shape == (2, 64, 64)


def test_unknown_combination_is_refused():
    with pytest.raises(ValueError, match="harmonic"):
        combine([torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)], "harmonic")


# ------------------------------------------------------------------------- localisation


def _one_block_case(row=2, col=5, latent=8, f=8):
    z0 = torch.randn(1, 4, latent, latent, generator=_gen(1))
    z0_hat = z0.clone()
    z0_hat[:, :, row, col] += 1.0
    rec = torch.zeros(1, 3, latent * f, latent * f)
    cor = rec.clone()
    cor[:, 1, row * f : (row + 1) * f, col * f : (col + 1) * f] = 0.9
    return z0, z0_hat, rec, cor


@pytest.mark.parametrize("how", COMBINATIONS)
def test_a_local_change_peaks_at_its_location(how):
    row, col = 2, 5
    z0, z0_hat, rec, cor = _one_block_case(row, col)
    maps = anomaly_maps(MapInputs(z0, z0_hat, (64, 64), reconstructed=rec, corrected=cor), MapConfig(combine=how))
    peak = int(maps[0].argmax())
    y, x = divmod(peak, 64)
    assert 8 * row <= y < 8 * (row + 1) and 8 * col <= x < 8 * (col + 1), (how, y, x)
    # far away from the change the map is (near) zero
    assert float(maps[0, 48:, :16].max()) < 1e-3
    # one saturated latent pixel, blurred with sigma 1: about k(0)^2 = 0.159 of it survives
    assert float(maps[0].max()) > 0.1


def test_latent_discrepancy_peaks_at_the_latent_pixel_on_a_non_square_latent():
    z0 = torch.zeros(1, 4, 6, 10)
    z0_hat = z0.clone()
    z0_hat[0, :, 3, 7] = 0.5  # not next to a border: reflect padding would double it there
    m = latent_discrepancy(z0_hat, z0, clip=0.5, sigma=1.0, size=(48, 80))
    assert m.shape == (1, 1, 48, 80)
    y, x = divmod(int(m[0, 0].argmax()), 80)
    assert 24 <= y < 32 and 56 <= x < 64


# ---------------------------------------------------------------------- combinations


def test_combinations_follow_their_formulas():
    z0, z0_hat, rec, cor = _random_case(seed=3)
    cfg = MapConfig()
    p = pixel_discrepancy(cor, rec, cfg.pixel_clip, cfg.pixel_sigma)
    lat = latent_discrepancy(z0_hat, z0, cfg.latent_clip, cfg.latent_sigma, (64, 64))
    assert p.shape == lat.shape == (2, 1, 64, 64)

    def run(how):
        return anomaly_maps(MapInputs(z0, z0_hat, (64, 64), reconstructed=rec, corrected=cor), dataclasses.replace(cfg, combine=how))

    torch.testing.assert_close(run("geometric"), (p * lat).sqrt()[:, 0])
    torch.testing.assert_close(run("arithmetic"), ((p + lat) / 2)[:, 0])
    torch.testing.assert_close(run("pixel"), p[:, 0])
    torch.testing.assert_close(run("latent"), lat[:, 0])
    assert not torch.allclose(run("pixel"), run("latent"))


def test_geometric_mean_needs_both_discrepancies():
    z0, _, rec, cor = _random_case(seed=4)
    # pixel differences only: the geometric mean stays 0, the arithmetic one does not
    geo = anomaly_maps(MapInputs(z0, z0.clone(), (64, 64), reconstructed=rec, corrected=cor), MapConfig(combine="geometric"))
    ari = anomaly_maps(MapInputs(z0, z0.clone(), (64, 64), reconstructed=rec, corrected=cor), MapConfig(combine="arithmetic"))
    pix = anomaly_maps(MapInputs(z0, z0.clone(), (64, 64), reconstructed=rec, corrected=cor), MapConfig(combine="pixel"))
    lat = anomaly_maps(MapInputs(z0, z0.clone(), (64, 64), reconstructed=rec, corrected=cor), MapConfig(combine="latent"))
    assert bool((geo == 0).all()) and bool((lat == 0).all())
    assert float(pix.max()) > 0.3
    torch.testing.assert_close(ari, pix / 2)


# -------------------------------------------------------------------------------- clip


@pytest.mark.parametrize("delta,expected", [(0.2, 0.25), (0.4, 0.5), (0.8, 1.0), (1.2, 1.0), (2.0, 1.0)])
def test_pixel_clip_semantics(delta, expected):
    """Images are in [-1, 1]; the discrepancy is measured on [0, 1] (half the difference),
    maximum over RGB, divided by the clip (0.4) and saturating at 1."""
    rec = torch.full((1, 3, 16, 16), -1.0)
    cor = rec.clone()
    cor[:, 2] += delta  # one channel only: max over RGB, not mean
    p = pixel_discrepancy(cor, rec, clip=0.4, sigma=0.0)
    assert p.shape == (1, 1, 16, 16)
    torch.testing.assert_close(p, torch.full_like(p, expected))


@pytest.mark.parametrize("delta,expected", [(0.05, 0.25), (0.1, 0.5), (0.2, 1.0), (0.7, 1.0)])
def test_latent_clip_semantics(delta, expected):
    z0 = torch.randn(1, 4, 4, 4, generator=_gen(5))
    lat = latent_discrepancy(z0 - delta, z0, clip=0.2, sigma=0.0, size=(4, 4))  # mean |diff| over channels
    torch.testing.assert_close(lat, torch.full_like(lat, expected))
    one = z0.clone()
    one[:, 0] += 4 * delta  # only one of 4 channels: the mean over channels is delta again
    torch.testing.assert_close(latent_discrepancy(one, z0, 0.2, 0.0, (4, 4)), torch.full_like(lat, expected))


def test_anomaly_map_clip_before_blur():
    """A discrepancy at or above the clip is 1 before the blur: a big uniform change is all 1."""
    z0 = torch.zeros(1, 4, 8, 8)
    rec = torch.zeros(1, 3, 64, 64)
    cfg = MapConfig(combine="geometric", pixel_clip=0.4, latent_clip=0.2)
    maps = anomaly_maps(MapInputs(z0, z0 + 5.0, (64, 64), reconstructed=rec, corrected=rec + 0.8), cfg)
    torch.testing.assert_close(maps, torch.ones_like(maps))
    # just below the clip it is not 1 (geometric mean of 0.5 and 0.5)
    half = anomaly_maps(MapInputs(z0, z0 + 0.1, (64, 64), reconstructed=rec, corrected=rec + 0.4), cfg)
    torch.testing.assert_close(half, torch.full_like(half, 0.5))


def test_clip_uses_the_configured_values():
    z0 = torch.zeros(1, 4, 8, 8)
    rec = torch.zeros(1, 3, 64, 64)
    lat = anomaly_maps(MapInputs(z0, z0 + 0.1, (64, 64), reconstructed=rec, corrected=rec), MapConfig(combine="latent", latent_clip=0.5, latent_sigma=0))
    torch.testing.assert_close(lat, torch.full_like(lat, 0.2))
    pix = anomaly_maps(MapInputs(z0, z0, (64, 64), reconstructed=rec, corrected=rec + 0.2), MapConfig(combine="pixel", pixel_clip=0.2, pixel_sigma=0))
    torch.testing.assert_close(pix, torch.full_like(pix, 0.5))


# -------------------------------------------------------------------------------- blur


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 3), (4, 7), (8, 8), (32, 32), (20, 64)])
@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_blur_preserves_a_constant_map(shape, sigma):
    m = torch.full((2, 1, *shape), 0.7)
    out = gaussian_blur(m, sigma)
    assert out.shape == m.shape
    torch.testing.assert_close(out, m, rtol=0, atol=1e-6)


def test_blur_of_a_delta_sums_to_one_and_spreads_by_sigma():
    sigma = 2.0
    m = torch.zeros(1, 1, 41, 41)
    m[0, 0, 20, 20] = 1
    out = gaussian_blur(m, sigma)
    assert abs(float(out.sum()) - 1) < 1e-5
    assert int(out[0, 0].argmax()) == 20 * 41 + 20
    torch.testing.assert_close(out, out.flip(-1))
    torch.testing.assert_close(out, out.flip(-2))
    torch.testing.assert_close(out, out.transpose(-1, -2))
    x = torch.arange(41.0) - 20
    var = float((out[0, 0].sum(dim=0) * x**2).sum())
    assert abs(var - sigma**2) < 0.05 * sigma**2  # truncated at 3 sigma: a hair narrower
    assert float(out[0, 0, 20, 20 + 7]) == 0  # radius 3 sigma = 6


def test_blur_with_zero_sigma_is_the_identity():
    m = torch.rand(2, 1, 9, 9, generator=_gen(6))
    assert torch.equal(gaussian_blur(m, 0.0), m)
    assert not torch.allclose(gaussian_blur(m, 1.0), m)


def test_latent_map_is_upsampled_bilinearly():
    """Bilinear, not nearest: no 8x8 blocks, a smooth ramp between latent pixels."""
    z0 = torch.zeros(1, 1, 4, 4)
    z0_hat = z0.clone()
    z0_hat[0, 0, 1, 2] = 0.5
    m = latent_discrepancy(z0_hat, z0, clip=0.5, sigma=0.0, size=(32, 32))[0, 0]
    block = m[8:16, 16:24]
    # output pixels sit 1/16 of a latent pixel off its centre (align_corners=False)
    assert float(block.max()) == pytest.approx((15 / 16) ** 2, abs=1e-5)
    assert float(block.min()) < 0.9  # its edges already fall off
    assert float((m[:, 1:] - m[:, :-1]).abs().max()) <= 1 / 8 + 1e-6  # no jumps
    assert float((m[1:] - m[:-1]).abs().max()) <= 1 / 8 + 1e-6
    assert 0 < float(m[8, 12]) < 1  # spills half a latent pixel into the neighbour
