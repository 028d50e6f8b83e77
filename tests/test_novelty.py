"""The map's novelty term: normal latents, nearest distances, their unit, fit and scoring."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from decodiff_cli import novelty
from decodiff_cli.anomaly_map import MapInputs, anomaly_maps
from decodiff_cli.bundle import NORMAL_LATENTS, BundleError, load_normal_latents, read_bundle
from decodiff_cli.config import MapConfig
from decodiff_cli.detector import Detector
from decodiff_cli.novelty import nearest_distance, neighbourhood, normal_bank, novelty_scale
from decodiff_cli.presets import build_config

from conftest import CATEGORY, Events, as_format_1, tiny_config


def _texture(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 4, 8, 8) latents of one stationary texture."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g) * 0.3 + torch.tensor([1.0, -1.0, 0.5, 0.0]).view(1, 4, 1, 1)


def test_neighbourhood_averages_each_place_with_its_3x3_neighbours():
    z = torch.zeros(1, 1, 5, 5)
    z[0, 0, 2, 2] = 9.0
    pooled = neighbourhood(z)
    assert pooled.shape == z.shape
    assert torch.allclose(pooled[0, 0, 1:4, 1:4], torch.ones(3, 3)) and pooled.sum() == 9.0
    assert torch.allclose(neighbourhood(torch.full((1, 2, 4, 4), 3.0)), torch.full((1, 2, 4, 4), 3.0))


def test_windows_concatenate_the_vector_and_its_neighbourhoods():
    z = torch.zeros(1, 2, 5, 5)
    z[0, :, 2, 2] = 9.0
    both = neighbourhood(z, windows=[1, 3])
    assert both.shape == (1, 4, 5, 5)
    assert torch.equal(both[:, :2], z) and torch.equal(both[:, 2:], neighbourhood(z))
    assert neighbourhood(z, windows=[5])[0, 0, 0, 0] == 9.0 / 25  # edges replicated, the spot is in every window


def test_a_one_pixel_defect_keeps_its_full_distance_in_the_one_pixel_window():
    latents = _texture(6)
    test = _texture(1, seed=9)
    test[0, :, 4, 4] += 3.0  # one latent pixel unlike any normal one
    bank, owner = normal_bank(lambda rows: latents[rows], torch.arange(6), size=384, windows=[3, 1])
    assert bank.shape == (384, 8)
    scales = novelty_scale(latents, torch.arange(6), bank, owner, [3, 1])
    assert len(scales) == 2 and scales[1] > scales[0]  # single vectors vary more than their averages
    distance = nearest_distance(test, bank, windows=[3, 1])[0] / torch.tensor(scales).view(2, 1, 1)
    around = distance[0, 3:6, 3:6]
    assert around.max() == distance[0].max() and around.max() - around.min() < 1  # spread over the 3x3 window
    assert distance[1, 4, 4] == distance[1].max() and distance[1, 4, 4] > 3 * around.max()  # undiluted
    # each window is matched on its own part of the bank: the first alone is today's term
    alone, _ = normal_bank(lambda rows: latents[rows], torch.arange(6), size=384)
    assert torch.allclose(nearest_distance(test, alone)[0, 0], nearest_distance(test, bank[:, :4])[0, 0])


def test_further_windows_add_what_they_have_beyond_the_normal_range():
    from decodiff_cli.anomaly_map import novelty_discrepancy

    distances = torch.tensor([0.5, 0.9, 1.5, 3.0]).view(1, 1, 1, 4)
    first_only = novelty_discrepancy(distances, 2.0, 0.0, (1, 4))
    assert torch.allclose(first_only, torch.tensor([0.25, 0.45, 0.75, 1.0]).view(1, 1, 1, 4))
    second = torch.tensor([0.9, 1.3, 1.2, 1.5]).view(1, 1, 1, 4)  # below 1: nothing; 1.3: .3 beyond it
    both = novelty_discrepancy(torch.cat([distances, second], dim=1), 2.0, 0.0, (1, 4))
    assert torch.allclose(both, torch.tensor([0.25, 0.75, 0.95, 1.0]).view(1, 1, 1, 4))  # added, at most 1
    at_place = torch.tensor([0.9, 1.5, 2.0, 1.0]).view(1, 1, 1, 4)  # the per-position view: at half weight
    with_positions = novelty_discrepancy(torch.cat([distances, at_place], dim=1), 2.0, 0.0, (1, 4), positions=True)
    assert torch.allclose(with_positions, torch.tensor([0.25, 0.70, 1.0, 1.0]).view(1, 1, 1, 4))
    spot = torch.zeros(1, 2, 9, 9)
    spot[0, 1, 4, 4] = 2.0  # a one-place hole seen only at its position: not blurred, unlike the term
    sharp = novelty_discrepancy(spot, 2.0, 1.0, (9, 9), positions=True)[0, 0]
    blunt = novelty_discrepancy(spot, 2.0, 1.0, (9, 9))[0, 0]  # the same channel read as a further window
    assert sharp[4, 4] == 0.5 and sharp.sum() == 0.5 and blunt[4, 4] < 0.25 and blunt[4, 6] > 0


def test_bank_is_seeded_and_drawn_from_the_images():
    latents = _texture(6)
    bank, owner = normal_bank(lambda rows: latents[rows], torch.arange(6), size=60)
    assert bank.shape == (60, 4) and owner.shape == (60,) and set(owner.tolist()) == set(range(6))
    vectors = neighbourhood(latents).permute(0, 2, 3, 1)
    for vector, image in zip(bank, owner):  # every vector is one of its image's
        assert (vectors[image].reshape(-1, 4) == vector).all(dim=1).any()
    again, _ = normal_bank(lambda rows: latents[rows], torch.arange(6), size=60)
    assert torch.equal(bank, again)
    everything, _ = normal_bank(lambda rows: latents[rows], torch.arange(6), size=10_000)
    assert len(everything) == 6 * 64  # fewer vectors than the cap: all of them


def test_covering_keeps_the_rare_vectors_a_random_sample_misses():
    g = torch.Generator().manual_seed(0)
    common = torch.randn(2000, 4, generator=g) * 0.1
    rare = torch.eye(4) * 5.0  # four normal but rare patterns, far from the rest and each other
    pool = torch.cat([common, rare])
    chosen = novelty.covering(pool, 40, torch.Generator().manual_seed(0))
    assert len(chosen) == 40 and len(chosen.unique()) == 40
    assert set(range(2000, 2004)) <= set(chosen.tolist())
    random_half = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:20]
    assert torch.equal(chosen[:20], random_half)  # half of the bank is still a random sample
    assert torch.equal(novelty.covering(pool[:30], 40, g), torch.arange(30))
    for size in (1, 2, 3, 5):  # tiny banks (--novelty-bank 1) too
        assert len(novelty.covering(pool, size, g).unique()) == size


def test_nearest_distance_is_zero_for_a_normal_image_and_grows_with_a_defect(monkeypatch):
    monkeypatch.setattr(novelty, "DISTANCES_PER_CHUNK", 7 * 256)  # chunking must not change the answer
    latents = _texture(4)
    bank, owner = normal_bank(lambda rows: latents[rows], torch.arange(4), size=10_000)
    assert torch.allclose(nearest_distance(latents[:1], bank), torch.zeros(1, 1, 8, 8), atol=1e-3)
    defective = latents[:1].clone()
    defective[0, :, 3:5, 3:5] += 4.0
    distance = nearest_distance(defective, bank)[0, 0]
    assert distance[3:5, 3:5].min() > 1.0 and distance[0, 0] < 1e-3
    brute = torch.cdist(novelty._vectors(neighbourhood(defective)), bank).amin(dim=1).view(8, 8)
    assert torch.allclose(distance, brute, atol=1e-5)
    # An image may not match its own vectors when they are excluded.
    excluded = nearest_distance(latents[:1], bank, exclude=(owner == 0)[None])
    assert excluded.min() > 0.01


def test_scale_is_the_99th_percentile_against_the_other_images():
    latents = _texture(5)
    bank, owner = normal_bank(lambda rows: latents[rows], torch.arange(5), size=10_000)
    rows = torch.tensor([0, 2, 4])
    scale = novelty_scale(latents[rows], rows, bank, owner)
    expected = torch.quantile(nearest_distance(latents[rows], bank, exclude=owner[None] == rows[:, None]).flatten(), 0.99)
    assert scale == pytest.approx(float(expected)) and scale > 0.05


def test_the_novelty_term_is_half_of_the_map():
    z0 = torch.randn(2, 4, 8, 8)
    cfg = MapConfig(combine="latent", latent_clip=1.0)
    plain = anomaly_maps(MapInputs(z0, z0 * 0.9, (32, 32)), cfg)
    distances = torch.zeros(2, 1, 8, 8)
    distances[0, 0, 2:4, 2:4] = 10.0  # beyond the clip: saturates
    with_novelty = anomaly_maps(MapInputs(z0, z0 * 0.9, (32, 32), novelty=distances), dataclasses.replace(cfg, novelty=True, latent_sigma=0.0))
    plain_sharp = anomaly_maps(MapInputs(z0, z0 * 0.9, (32, 32)), dataclasses.replace(cfg, latent_sigma=0.0))
    assert torch.allclose(with_novelty[1], plain_sharp[1] / 2, atol=1e-6)  # no novelty: the map halves
    assert with_novelty[0, 12, 12] == pytest.approx(float(plain_sharp[0, 12, 12] + 1) / 2, abs=1e-5)
    assert plain.shape == with_novelty.shape
    with pytest.raises(ValueError, match="novelty term needs"):
        anomaly_maps(MapInputs(z0, z0, (32, 32)), dataclasses.replace(cfg, novelty=True))


@pytest.fixture(scope="module")
def novelty_bundle(tmp_path_factory, category_dir):
    from decodiff_cli.fitting import fit
    from decodiff_cli.inputs import find_training_images

    images, _ = find_training_images([str(category_dir)])
    cfg = tiny_config(max_steps=3)
    cfg.anomaly_map = MapConfig(combine="arithmetic", novelty=True, novelty_bank=100)
    out = tmp_path_factory.mktemp("novelty") / "model"
    events = []
    fit(images, out, cfg, progress=Events(lambda kind, info: events.append(kind)))
    assert "novelty" in events
    return out


def test_fit_stores_the_normal_latents_and_scoring_uses_them(novelty_bundle, test_images):
    bundle = read_bundle(novelty_bundle)
    map_cfg = bundle.config.anomaly_map
    assert map_cfg.novelty and bundle.config.measured.novelty_scales[CATEGORY] > 0
    banks = load_normal_latents(bundle)
    assert list(banks) == [CATEGORY] and banks[CATEGORY].shape == (100, bundle.config.denoiser.latent_channels)
    detector = Detector.load(novelty_bundle, device="cpu")
    with_novelty = list(detector.predict(test_images[:3]))
    assert all(p.error is None for p in with_novelty)
    detector.model.cfg = dataclasses.replace(detector.model.cfg, anomaly_map=MapConfig(combine="arithmetic"))
    plain = list(detector.predict(test_images[:3]))
    assert any(abs(a.score - b.score) > 1e-6 for a, b in zip(with_novelty, plain))


def test_a_format_1_bundle_scores_identically(novelty_bundle, test_images, tmp_path):
    """A bundle of decodiff 0.2.0 (the novelty scales among the map's settings) is converted on read."""
    import json
    import shutil

    from decodiff_cli import bundle as bundle_mod

    old = tmp_path / "old"
    shutil.copytree(novelty_bundle, old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(as_format_1(config)))
    bundle_mod._write_checksums(old)
    assert read_bundle(old).config == read_bundle(novelty_bundle).config
    scores = [[p.score for p in Detector.load(b, device="cpu").predict(test_images[:3])] for b in (old, novelty_bundle)]
    assert scores[0] == scores[1] and all(s == s for s in scores[0])


def test_a_bundle_without_its_normal_latents_is_refused(novelty_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(novelty_bundle, copy)
    (copy / NORMAL_LATENTS).unlink()
    with pytest.raises(BundleError, match=f"{NORMAL_LATENTS} is missing"):
        load_normal_latents(read_bundle(copy, verify=False))


def test_each_class_is_measured_against_its_own_normal_latents(novelty_bundle):
    model = Detector.load(novelty_bundle, device="cpu").model
    near = torch.zeros(4, model.cfg.denoiser.latent_channels)
    model.cfg = dataclasses.replace(model.cfg, categories=["a", "b"])
    model.cfg.measured = dataclasses.replace(model.cfg.measured, novelty_scales={"a": 1.0, "b": 2.0})
    model.normal_latents = {"a": near, "b": near + 3.0}
    z0 = torch.zeros(2, model.cfg.denoiser.latent_channels, 4, 4)
    distances = model._novelty(z0, torch.tensor([0, 1]))
    assert torch.allclose(distances[0], torch.zeros(1, 4, 4))
    expected = 3.0 * model.cfg.denoiser.latent_channels ** 0.5 / 2.0  # distance to b's vectors, in b's unit
    assert torch.allclose(distances[1], torch.full((1, 4, 4), expected))
    model.normal_latents = {"a": near}
    with pytest.raises(ValueError, match="no normal latents for b"):
        model._novelty(z0, torch.tensor([0, 1]))


def test_novelty_is_a_cpu_default_and_a_fit_option():
    assert build_config("cpu", {}).anomaly_map.novelty
    assert not build_config("paper", {}).anomaly_map.novelty
    assert not build_config("cpu", {"map_novelty": False}).anomaly_map.novelty
    assert not build_config("cpu", {"map_combine": "latent"}).anomaly_map.novelty  # a one-term map, as asked
    assert build_config("cpu", {"map_combine": "latent", "map_novelty": True}).anomaly_map.novelty
    assert not build_config("cpu", {"autoencoder": "pixel"}).anomaly_map.novelty  # raw pixels: no feature space
    assert build_config("cpu", {"autoencoder": "pixel", "map_novelty": True}).anomaly_map.novelty
    assert build_config("cpu", {"novelty_bank": 1000}).anomaly_map.novelty_bank == 1000
    with pytest.raises(ValueError, match="--novelty-bank must be at least 1"):
        build_config("cpu", {"novelty_bank": 0})  # a config file is not checked by the CLI's min=1
    assert build_config("cpu", {"novelty_weight": 0.25}).anomaly_map.novelty_weight == 0.25
    for weight in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--novelty-weight must be between 0 and 1"):
            build_config("cpu", {"novelty_weight": weight})
    assert build_config("cpu", {"novelty_windows": [1, 3]}).anomaly_map.novelty_windows == [1, 3]
    for windows in ([], [2], [3, 3], [0], [1.5]):
        with pytest.raises(ValueError, match="novelty_windows must be distinct odd"):
            build_config("cpu", {"novelty_windows": windows})


def test_the_novelty_weight_sets_the_terms_shares():
    z0 = torch.randn(1, 4, 8, 8)
    cfg = MapConfig(combine="latent", latent_clip=1.0, latent_sigma=0.0, novelty=True)
    distances = torch.full((1, 1, 8, 8), 10.0)  # beyond the clip everywhere: the term is 1
    correction = anomaly_maps(MapInputs(z0, z0 * 0.9, (32, 32)), dataclasses.replace(cfg, novelty=False))
    for weight in (0.0, 2 / 3, 1.0):
        mixed = anomaly_maps(MapInputs(z0, z0 * 0.9, (32, 32), novelty=distances), dataclasses.replace(cfg, novelty_weight=weight))
        assert torch.allclose(mixed, (1 - weight) * correction + weight, atol=1e-6)


def test_info_mentions_the_novelty_term(invoke, novelty_bundle):
    result = invoke("info", novelty_bundle)
    assert result.exit_code == 0, result.output
    assert "novelty term" in " ".join(result.stdout.split()) and "windows" not in result.stdout


@pytest.mark.parametrize("bank_size", [1, 7, 512, 1300])
def test_nearest_distance_matches_brute_force_in_blocks(monkeypatch, bank_size):
    monkeypatch.setattr(novelty, "DISTANCES_PER_CHUNK", 3000)  # several query chunks and bank blocks
    generator = torch.Generator().manual_seed(bank_size)
    z = torch.randn(2, 4, 6, 5, generator=generator)
    bank = torch.randn(bank_size, 4, generator=generator)
    exclude = torch.rand(2, bank_size, generator=generator) < 0.3
    exclude[:, 0] = False  # every image keeps a candidate
    queries = neighbourhood(z).permute(0, 2, 3, 1).reshape(2, -1, 4)
    for i in range(2):
        d = torch.cdist(queries[i].double(), bank.double())
        d[:, exclude[i]] = float("inf")
        expected = d.amin(dim=1).float().view(6, 5)
        assert torch.allclose(nearest_distance(z[i:i + 1], bank, exclude[i:i + 1])[0, 0], expected, atol=1e-4)


def test_a_model_with_two_windows_fits_and_scores(invoke, tmp_path, category_dir, test_images):
    from decodiff_cli.fitting import fit
    from decodiff_cli.inputs import find_training_images

    images, _ = find_training_images([str(category_dir)])
    cfg = tiny_config(max_steps=2)
    cfg.anomaly_map = MapConfig(combine="arithmetic", novelty=True, novelty_bank=100, novelty_windows=[3, 1])
    fit(images, tmp_path / "model", cfg)
    bundle = read_bundle(tmp_path / "model")
    scales = bundle.config.measured.novelty_scales[CATEGORY]
    assert len(scales) == 2 and all(s > 0 for s in scales)
    assert load_normal_latents(bundle)[CATEGORY].shape == (100, 2 * bundle.config.denoiser.latent_channels)
    predictions = list(Detector.load(tmp_path / "model", device="cpu").predict(test_images[:2]))
    assert all(p.error is None and 0 <= p.score <= 1 for p in predictions)
    assert "windows [3, 1]" in " ".join(invoke("info", tmp_path / "model").stdout.split())


def test_a_hole_that_matches_normal_texture_elsewhere_stands_out_at_its_own_position():
    from decodiff_cli.novelty import position_distance, position_scale, position_statistics

    latents = _texture(8)
    latents[:, :, 0, 0] = -2.0  # every normal image has a dark corner
    test = _texture(1, seed=9)
    test[0, :, 0, 0] = -2.0
    test[0, :, 4, 4] = -2.0  # the same dark vector in the middle: a hole
    bank, owner = normal_bank(lambda rows: latents[rows], torch.arange(8), size=512, windows=[1])
    anywhere = nearest_distance(test, bank, windows=[1])[0, 0] / novelty_scale(latents, torch.arange(8), bank, owner, [1])
    statistics = position_statistics(lambda rows: latents[rows], torch.arange(8))
    assert statistics.shape == (5, 4, 8, 8) and torch.allclose(statistics[0], latents.mean(dim=0))
    at_place = position_distance(test, statistics)[0] / position_scale(latents, statistics, 8)
    assert anywhere[4, 4] < 1.5  # the nearest normal vector, in the corner, is close: not novel
    assert at_place[4, 4] == at_place.max() and at_place[4, 4] > 3  # far from what is normal there
    assert at_place[0, 0] < 1  # the dark corner is normal in its place


def test_the_positions_see_an_unusual_direction_not_only_a_large_deviation():
    from decodiff_cli.novelty import position_distance, position_statistics

    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, 1, 4, 4, generator=g)
    latents = torch.cat([t, t, 0.1 * torch.randn(200, 2, 4, 4, generator=g)], dim=1)  # channels 0 and 1 move together
    statistics = position_statistics(lambda rows: latents[rows], torch.arange(200))
    along, across = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    along[:, :2] = 1.0  # as normal images vary
    across[:, 0], across[:, 1] = 1.0, -1.0  # the same size per channel, against the normal variation
    assert (position_distance(across, statistics) > 1.5 * position_distance(along, statistics)).all()


def test_the_positions_unit_leaves_each_image_out_of_the_mean():
    from decodiff_cli.novelty import position_distance, position_scale, position_statistics

    latents = _texture(2)
    statistics = position_statistics(lambda rows: latents[rows], torch.arange(2))
    swapped = position_distance(latents, statistics, mean=latents.flip(0))  # each against the other image
    assert position_scale(latents, statistics, 2) == pytest.approx(float(torch.quantile(swapped.flatten(), 0.99)), rel=1e-5)
    assert position_scale(latents, statistics, 2) > float(torch.quantile(position_distance(latents, statistics).flatten(), 0.99))
    with pytest.raises(ValueError, match="position statistics are for"):
        position_distance(latents[:, :, :4], statistics)


def test_a_model_with_the_positions_fits_stores_them_and_scores(invoke, tmp_path, category_dir, test_images):
    import shutil

    from decodiff_cli import bundle as bundle_mod
    from decodiff_cli.fitting import fit
    from decodiff_cli.inputs import find_training_images

    assert build_config("cpu", {}).anomaly_map.novelty_positions  # the default
    assert not build_config("cpu", {"novelty_positions": False}).anomaly_map.novelty_positions
    with pytest.raises(ValueError, match="novelty_clip must be above 1"):
        MapConfig(novelty=True, novelty_positions=True, novelty_clip=1.0).validate()
    images, _ = find_training_images([str(category_dir)])
    cfg = tiny_config(max_steps=2)
    cfg.anomaly_map = MapConfig(combine="arithmetic", novelty=True, novelty_bank=100, novelty_positions=True)
    fit(images, tmp_path / "model", cfg)
    bundle = read_bundle(tmp_path / "model")
    scales = bundle.config.measured.novelty_scales[CATEGORY]
    assert len(scales) == 2 and all(s > 0 for s in scales)
    stored = load_normal_latents(bundle)[f"{CATEGORY}/positions"]
    c = bundle.config.denoiser.latent_channels
    assert stored.shape[:2] == (c + 1, c) and tuple(stored.shape[2:]) == bundle.config.denoiser.latent_shape
    detector = Detector.load(tmp_path / "model", device="cpu")
    with_positions = list(detector.predict(test_images[:2]))
    assert all(p.error is None and 0 <= p.score <= 1 for p in with_positions)
    assert "and at each position" in " ".join(invoke("info", tmp_path / "model").stdout.split())
    # without its statistics the bundle is refused, with the file named
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "model", copy)
    banks = bundle_mod.load_state(copy / NORMAL_LATENTS)
    bundle_mod._save_tensors(copy / NORMAL_LATENTS, {CATEGORY: banks[CATEGORY]})
    with pytest.raises(BundleError, match=f"{CATEGORY}/positions"):
        load_normal_latents(read_bundle(copy, verify=False))


def test_each_class_is_measured_against_its_own_positions(novelty_bundle):
    model = Detector.load(novelty_bundle, device="cpu").model
    c = model.cfg.denoiser.latent_channels
    near = torch.zeros(4, c)
    model.cfg = dataclasses.replace(model.cfg, categories=["a", "b"],
                                    anomaly_map=dataclasses.replace(model.cfg.anomaly_map, novelty_positions=True))
    model.cfg.measured = dataclasses.replace(model.cfg.measured, novelty_scales={"a": [1.0, 1.0], "b": [1.0, 2.0]})
    ones = torch.ones(c, 4, 4)
    identity = torch.eye(c)[:, :, None, None].expand(c, c, 4, 4)  # unit spread in every direction
    model.normal_latents = {"a": near, "b": near, "a/positions": torch.cat([0 * ones[None], identity]),
                            "b/positions": torch.cat([3 * ones[None], identity])}
    distances = model._novelty(torch.zeros(2, c, 4, 4), torch.tensor([0, 1]))
    assert distances.shape == (2, 2, 4, 4)
    assert torch.allclose(distances[0, 1], torch.zeros(4, 4))  # at a's mean
    assert torch.allclose(distances[1, 1], torch.full((4, 4), 1.5))  # 3 spreads from b's mean, in b's unit of 2
    del model.normal_latents["b/positions"]
    with pytest.raises(ValueError, match="no normal latents for b"):
        model._novelty(torch.zeros(2, c, 4, 4), torch.tensor([0, 1]))
