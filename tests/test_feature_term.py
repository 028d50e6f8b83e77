"""The map's decoder-feature term: decoder feature maps of the correction vs the input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from decodiff_cli.anomaly_map import MapInputs, anomaly_maps, combine, feature_discrepancy, feature_scales, shift_images
from decodiff_cli.autoencoders.pixel import PixelAutoencoder
from decodiff_cli.bundle import read_bundle
from decodiff_cli.config import LatentScaling, MapConfig
from decodiff_cli.detector import Detector
from decodiff_cli.images import load_image
from decodiff_cli.presets import build_config

from conftest import CATEGORY, Events, tiny_config
from test_taesd_folder import TINY_PLAIN, _random_net, _write_pair


def test_feature_discrepancy_is_in_units_of_the_normal_scale():
    levels = [torch.full((2, 1, 4, 4), 0.3), torch.full((2, 1, 8, 8), 3.0)]
    scales = torch.tensor([[0.3, 1.0], [0.6, 1.0]])  # per image: its class's scales
    maps = feature_discrepancy(levels, scales, clip=2.0, size=(16, 16))
    assert maps.shape == (2, 1, 16, 16)
    # image 0: level 0 at 1x its scale -> 0.5, level 1 clipped at 2x -> 1.0; image 1: 0.25 and 1.0
    assert torch.allclose(maps[0], torch.full((1, 16, 16), 0.75))
    assert torch.allclose(maps[1], torch.full((1, 16, 16), 0.625))
    with pytest.raises(ValueError, match="feature levels"):
        feature_discrepancy(levels[:1], scales, 2.0, (16, 16))


def test_feature_scales_are_the_99th_percentile_per_level():
    level = torch.arange(1000, dtype=torch.float32).reshape(10, 1, 10, 10)
    assert feature_scales([level, torch.zeros(2, 1, 3, 3)]) == pytest.approx([989.01, 1e-6])


def test_three_terms_combine_as_their_mean():
    a, b, c = torch.full((1, 1, 2, 2), 0.8), torch.full((1, 1, 2, 2), 0.4), torch.full((1, 1, 2, 2), 0.2)
    assert torch.allclose(combine([a, b, c], "arithmetic"), torch.full_like(a, 1.4 / 3))
    assert torch.allclose(combine([a, b, c], "geometric"), torch.full_like(a, 0.4))
    with pytest.raises(ValueError, match="harmonic"):
        combine([a, b], "harmonic")


def test_feature_term_needs_its_inputs():
    z0 = torch.zeros(1, 4, 8, 8)
    image = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="feature term"):
        anomaly_maps(MapInputs(z0, z0, (64, 64), reconstructed=image, corrected=image), MapConfig(combine="arithmetic", features=True))
    with pytest.raises(ValueError, match="third term"):
        anomaly_maps(MapInputs(z0, z0, (64, 64), reconstructed=image, corrected=image, features=[], feature_scales=torch.zeros(1, 0)), MapConfig(combine="latent", features=True))


def test_map_features_option_needs_a_mean_of_terms():
    assert build_config("cpu", {"map_features": True}).anomaly_map.features
    with pytest.raises(ValueError, match="--map-features"):
        build_config("cpu", {"map_features": True, "map_combine": "latent"})
    assert not build_config("cpu", {"map_combine": "latent"}).anomaly_map.features  # the preset's default yields


def test_decoders_expose_one_feature_level_per_upsampling():
    net = _random_net(TINY_PLAIN)
    z = torch.randn(2, 16, 4, 4)
    image, features = net.decode_with_features(z)
    assert [f.shape[-1] for f in features] == [4, 8, 16]  # coarse to fine, before each 2x
    assert torch.equal(image, net.decode(z))
    assert all(not stage._forward_pre_hooks for stage in net.feature_stages())  # hooks removed
    assert PixelAutoencoder().decode_with_features(torch.zeros(1, 192, 2, 2))[1] == []


def test_features_alone_stop_the_decoder_at_the_last_level_asked_for():
    net = _random_net(TINY_PLAIN)
    z = torch.randn(2, 16, 4, 4)
    _, every = net.decode_with_features(z)
    ran = []
    last = net.decoder[-1].register_forward_hook(lambda *args: ran.append(True))
    image, features = net.decode_with_features(z, image=False)
    assert image is None and not ran  # the full-resolution layers were skipped
    assert all(torch.equal(a, b) for a, b in zip(features, every)) and len(features) == 3
    image, two = net.decode_with_features(z, image=False, levels=2)
    assert [f.shape[-1] for f in two] == [4, 8]
    last.remove()
    assert all(not stage._forward_pre_hooks for stage in net.feature_stages())


def test_a_map_without_the_pixel_term_decodes_only_to_the_features(tmp_path):
    from decodiff_cli.denoiser import Denoiser
    from decodiff_cli.model import DecoDiffModel, InferenceOptions

    net = _random_net(TINY_PLAIN)
    cfg = dataclasses.replace(tiny_config(), categories=[CATEGORY])
    cfg.autoencoder = dataclasses.replace(cfg.autoencoder, spec="taesd", latent_channels=16)
    cfg.denoiser = dataclasses.replace(cfg.denoiser, latent_channels=16, latent_size=4)
    cfg.preprocess = dataclasses.replace(cfg.preprocess, image_size=32, resize=32)
    cfg.anomaly_map = MapConfig(combine="arithmetic", features=True, pixel=False)
    cfg.latent_scaling = LatentScaling(kind="none")
    cfg.measured.feature_scales = {CATEGORY: [1.0, 1.0, 1.0]}
    model = DecoDiffModel(cfg, net, Denoiser(cfg.denoiser))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ran = []
    last = net.decoder[-1].register_forward_hook(lambda *args: ran.append(True))
    out = model.infer(images)
    assert not ran and out.corrected is None
    z0 = model.encode(images)
    z0_hat = model.correct(z0)
    _, _, levels = model.decode_pairs(z0, z0_hat, features=True)  # the full decode's features
    expected = anomaly_maps(MapInputs(z0, z0_hat, (32, 32), features=levels, feature_scales=torch.ones(2, 3)),
                            cfg.anomaly_map)
    assert torch.allclose(out.maps, expected, atol=1e-6)
    kept = model.infer(images, options=InferenceOptions(keep_corrected=True))
    assert ran and kept.corrected.shape == (2, 3, 32, 32)  # the corrected image, decoded on its own
    last.remove()


def test_diffusers_decoder_features():
    from diffusers import AutoencoderKL, AutoencoderTiny

    from decodiff_cli.autoencoders.diffusers_vae import DiffusersAutoencoder

    kl = DiffusersAutoencoder("kl", AutoencoderKL(
        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=4))
    tiny = DiffusersAutoencoder("tiny", AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4))
    for net, latent in ((kl, torch.randn(1, 4, 4, 4)), (tiny, torch.randn(1, 4, 4, 4))):
        image, features = net.decode_with_features(latent)
        assert [f.shape[-1] for f in features] == [4, 8], net.kind
        assert image.shape[-1] == 16


def _calm_net():
    """A random TAESD whose activations stay O(1): at full random scale they reach 1e4,
    where batch-size-dependent rounding alone moves the output by 1e-2."""
    net = _random_net(TINY_PLAIN)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    return net


@pytest.fixture(scope="module")
def feature_bundle(tmp_path_factory, category_dir):
    from decodiff_cli.fitting import fit
    from decodiff_cli.inputs import find_training_images

    folder = tmp_path_factory.mktemp("taesd")
    _write_pair(folder, _calm_net())
    images, _ = find_training_images([str(category_dir)])
    cfg = tiny_config(max_steps=3)
    cfg.autoencoder.spec = str(folder)
    cfg.anomaly_map = MapConfig(combine="arithmetic", features=True)
    out = tmp_path_factory.mktemp("features") / "model"
    fit(images, out, cfg)
    return out


def test_fit_measures_the_feature_scales_and_scoring_uses_them(feature_bundle, test_images):
    config = read_bundle(feature_bundle).config
    map_cfg, measured = config.anomaly_map, config.measured
    assert map_cfg.features and len(measured.feature_scales[CATEGORY]) == 3
    assert all(s > 0 for s in measured.feature_scales[CATEGORY])
    with_features = list(Detector.load(feature_bundle, device="cpu").predict(test_images[:3]))
    assert all(p.error is None for p in with_features)
    without = Detector.load(feature_bundle, device="cpu")
    without.model.cfg = dataclasses.replace(without.model.cfg, anomaly_map=MapConfig(combine="arithmetic"))
    plain = list(without.predict(test_images[:3]))
    assert any(abs(a.score - b.score) > 1e-6 for a, b in zip(with_features, plain))


def test_decode_pairs_matches_decoding_each(feature_bundle):
    model = Detector.load(feature_bundle, device="cpu").model
    z0 = torch.randn(3, 16, 8, 8)
    z0_hat = z0 + 0.5 * torch.randn(3, 16, 8, 8)
    reconstructed, corrected, levels = model.decode_pairs(z0, z0_hat, features=True)
    assert torch.allclose(reconstructed, model.decode(z0), atol=1e-5)
    assert torch.allclose(corrected, model.decode(z0_hat), atol=1e-5)
    assert [tuple(level.shape) for level in levels] == [(3, 1, 8, 8), (3, 1, 16, 16), (3, 1, 32, 32)]
    assert torch.allclose(model.decode_pairs(z0, z0, features=True)[2][0], torch.zeros(3, 1, 8, 8))
    plain = model.decode_pairs(z0, z0_hat, features=False)  # no hooks, no feature work
    assert plain[2] == [] and torch.allclose(plain[1], corrected, atol=1e-5)


def test_info_mentions_the_feature_term(invoke, feature_bundle):
    result = invoke("info", feature_bundle)
    assert result.exit_code == 0, result.output
    assert "decoder-feature term" in " ".join(result.stdout.split())


def test_pixel_backend_fits_without_the_feature_term(category_dir, tmp_path):
    from decodiff_cli.fitting import fit
    from decodiff_cli.inputs import find_training_images

    images, _ = find_training_images([str(category_dir)])
    cfg = tiny_config(max_steps=2)
    cfg.anomaly_map = MapConfig(combine="arithmetic", features=True)
    events = []
    fit(images, tmp_path / "model", cfg, progress=Events(lambda kind, info: events.append((kind, info))))
    assert not read_bundle(tmp_path / "model").config.anomaly_map.features
    assert any(kind == "note" and "decoder features" in info["message"] for kind, info in events)


# ------------------------------------------------------------------- the shifted view


def test_shift_images_moves_content_and_replicates_the_edge():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    moved = shift_images(x, 1)
    assert torch.equal(moved[0, 0, 1:, 1:], x[0, 0, :3, :3])
    assert torch.equal(moved[0, 0, 0, 1:], x[0, 0, 0, :3])  # the top edge replicated
    assert torch.equal(shift_images(moved, -1)[0, 0, :3, :3], x[0, 0, :3, :3])


def test_shifted_view_averages_two_maps_only_for_unaligned_classes(feature_bundle, test_images):
    detector = Detector.load(feature_bundle, device="cpu")
    model = detector.model
    images = torch.stack([load_image(p, model.cfg.preprocess).tensor for p in test_images[:2]])
    plain = model.infer(images).maps
    model.cfg.anomaly_map.shifted_view = True
    shifted = model.infer(images)
    assert shifted.maps.shape == plain.shape and not torch.allclose(shifted.maps, plain)
    d = model.cfg.autoencoder.downsample // 2  # half a latent pixel
    model.cfg.anomaly_map.shifted_view = False
    second = model.infer(shift_images(images, d)).maps
    assert torch.allclose(shifted.maps, (plain + shift_images(second[:, None], -d)[:, 0]) / 2, atol=1e-5)
    # An aligned class with its own reference keeps the single view.
    model.cfg.anomaly_map = dataclasses.replace(model.cfg.anomaly_map, shifted_view=True, reference="position")
    model.cfg.measured = dataclasses.replace(model.cfg.measured, alignment={CATEGORY: 0.1})
    model.reference = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])[None]
    with_reference = model.infer(images).maps
    model.cfg.anomaly_map.shifted_view = False
    assert torch.allclose(with_reference, model.infer(images).maps)


def test_shifted_view_is_a_fit_option():
    assert build_config("cpu", {"shifted_view": True}).anomaly_map.shifted_view
    assert not build_config("cpu", {}).anomaly_map.shifted_view
