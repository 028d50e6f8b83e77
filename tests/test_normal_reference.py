"""The map's normal reference: the latent discrepancy as a z-score against normal images."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from decodiff_cli.anomaly_map import MapInputs, alignment, anomaly_maps, identity_reference, latent_discrepancy, normal_reference
from decodiff_cli.bundle import REFERENCE, BundleError, _save_tensors, _write_checksums, load_networks, read_bundle
from decodiff_cli.config import ALIGNED_BELOW, MapConfig
from decodiff_cli.detector import Detector
from decodiff_cli.presets import build_config

from conftest import CATEGORY, tiny_config


def test_normal_reference_is_per_position_mean_and_spread():
    differences = torch.zeros(5, 1, 12, 12)
    differences[:, 0, 6, 5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    reference = normal_reference(differences)
    assert reference.shape == (2, 12, 12)
    mean, spread = reference
    assert mean.argmax() == 6 * 12 + 5 and spread.argmax() == 6 * 12 + 5  # blurred, but peaks where it varied
    assert mean.sum() == pytest.approx(3.0, rel=1e-4)  # the blur (away from borders) keeps the mass
    with pytest.raises(ValueError, match="at least 2"):
        normal_reference(differences[:1])


def test_reference_discounts_places_that_always_change():
    """Two equal raw differences: the one where normal images also differ scores lower."""
    z0 = torch.zeros(1, 4, 8, 8)
    z0_hat = z0.clone()
    z0_hat[0, :, 1, 1] = 1.0  # a place normal images also change
    z0_hat[0, :, 6, 6] = 1.0  # a place that never changes on normal images
    normal = torch.zeros(2, 8, 8)
    normal[0, 1, 1] = 0.9
    normal[1] = 0.1
    raw = latent_discrepancy(z0_hat, z0, 0.5, 0.0, (8, 8))
    assert raw[0, 0, 1, 1] == pytest.approx(raw[0, 0, 6, 6])
    scored = latent_discrepancy(z0_hat, z0, 6.0, 0.0, (8, 8), normal[None])
    assert scored[0, 0, 1, 1] < scored[0, 0, 6, 6]
    assert float(scored.min()) == 0.0  # below the normal mean clips to zero


def test_anomaly_maps_check_the_reference():
    z0 = torch.zeros(1, 4, 8, 8)
    cfg = MapConfig(combine="latent", reference="position")
    with pytest.raises(ValueError, match="normal statistics"):
        anomaly_maps(MapInputs(z0, z0, (8, 8)), cfg)
    with pytest.raises(ValueError, match="unknown map reference"):
        anomaly_maps(MapInputs(z0, z0, (8, 8), reference=torch.zeros(1, 2, 8, 8)), dataclasses.replace(cfg, reference="pixelwise"))
    # "none" ignores a reference it is handed: the paper's map
    plain = anomaly_maps(MapInputs(z0, z0 + 0.1, (8, 8), reference=torch.ones(1, 2, 8, 8)), MapConfig(combine="latent"))
    assert torch.allclose(plain, torch.full_like(plain, 0.2))


def test_fit_options_validate_the_map():
    cfg = build_config("cpu", {"map_combine": "geometric", "map_reference": "none"})
    assert (cfg.anomaly_map.combine, cfg.anomaly_map.reference) == ("geometric", "none")
    with pytest.raises(ValueError, match="--map must be"):
        build_config("cpu", {"map_combine": "harmonic"})
    with pytest.raises(ValueError, match="--map-reference must be"):
        build_config("cpu", {"map_reference": "global"})


@pytest.fixture(scope="module")
def reference_bundle(tmp_path_factory, category_dir):
    from decodiff_cli.fitting import fit
    from decodiff_cli.inputs import find_training_images

    images, _ = find_training_images([str(category_dir)])
    cfg = tiny_config(max_steps=10)
    cfg.anomaly_map = MapConfig(combine="arithmetic", reference="position")
    out = tmp_path_factory.mktemp("reference") / "model"
    fit(images, out, cfg)
    return out


def test_fit_stores_the_reference_and_scoring_uses_it(reference_bundle, test_images):
    assert (reference_bundle / REFERENCE).is_file()
    _, _, reference = load_networks(read_bundle(reference_bundle))
    assert reference.shape == (1, 2, 8, 8) and torch.isfinite(reference).all() and (reference[:, 1] >= 0).all()
    with_reference = Detector.load(reference_bundle, device="cpu")
    predictions = list(with_reference.predict(test_images[:2]))
    assert all(p.error is None for p in predictions)
    # The same weights without the reference give other maps: the reference is really used.
    without = Detector.load(reference_bundle, device="cpu")
    without.model.cfg = dataclasses.replace(without.model.cfg, anomaly_map=MapConfig(combine="arithmetic"))
    plain = list(without.predict(test_images[:2]))
    assert any(abs(a.score - b.score) > 1e-6 for a, b in zip(predictions, plain))
    assert CATEGORY in with_reference.thresholds


def test_bundle_without_its_reference_is_refused(reference_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference_bundle, copy)
    (copy / REFERENCE).unlink()
    _write_checksums(copy)
    with pytest.raises(BundleError, match="is missing"):
        load_networks(read_bundle(copy))
    _save_tensors(copy / REFERENCE, {"reference": torch.zeros(3, 2, 8, 8)})  # wrong number of classes
    _write_checksums(copy)
    with pytest.raises(BundleError, match="expected a"):
        load_networks(read_bundle(copy))


def test_alignment_tells_aligned_images_from_shifted_ones():
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randn(1, 4, 16, 16, generator=gen)
    aligned = pattern + 0.2 * torch.randn(20, 4, 16, 16, generator=gen)
    shifted = torch.stack([torch.roll(pattern[0], (int(dy), int(dx)), dims=(1, 2))
                           for dy, dx in torch.randint(0, 16, (20, 2), generator=gen)])
    assert alignment(aligned) < 0.3
    assert alignment(shifted) > 0.8


def test_identity_reference_gives_the_papers_map():
    cfg = MapConfig(combine="latent")
    z0 = torch.randn(3, 4, 8, 8)
    z0_hat = z0 + 0.4 * torch.randn(3, 4, 8, 8)
    plain = anomaly_maps(MapInputs(z0, z0_hat, (32, 32)), cfg)
    identity = identity_reference(cfg, (8, 8))[None].expand(3, -1, -1, -1)
    with_identity = anomaly_maps(MapInputs(z0, z0_hat, (32, 32), reference=identity), dataclasses.replace(cfg, reference="position"))
    assert torch.allclose(plain, with_identity, atol=1e-4)


def test_auto_reference_is_per_class(tmp_path):
    """An aligned class gets its own statistics; an unaligned one keeps the paper's map."""
    from decodiff_cli.fitting import fit

    gen = np.random.default_rng(0)
    ramp = np.linspace(30, 220, 64)[None, :, None] * np.ones((64, 1, 3))
    images = {}
    for name in ("aligned", "shuffled"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(8):
            if name == "aligned":
                pixels = ramp + gen.normal(0, 4, ramp.shape)
            else:
                pixels = gen.uniform(0, 255, (64, 64, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
        images[name] = sorted(folder.glob("*.png"))
    cfg = tiny_config(max_steps=4)
    cfg.anomaly_map = MapConfig(reference="auto")
    fit(images, tmp_path / "model", cfg)
    detector = Detector.load(tmp_path / "model", device="cpu")
    map_cfg = detector.bundle.config.anomaly_map
    assert map_cfg.reference == "position"
    measured = detector.bundle.config.measured
    assert measured.alignment["aligned"] < ALIGNED_BELOW <= measured.alignment["shuffled"]
    reference = detector.model.reference
    assert torch.allclose(reference[1], identity_reference(map_cfg, (8, 8)))
    assert not torch.allclose(reference[0], identity_reference(map_cfg, (8, 8)))


def test_auto_reference_off_when_no_class_is_aligned(category_dir, tmp_path):
    from decodiff_cli.fitting import fit
    from decodiff_cli.inputs import find_training_images

    images, _ = find_training_images([str(category_dir)])
    cfg = tiny_config(max_steps=2)
    cfg.anomaly_map = MapConfig(reference="auto")
    fit(images, tmp_path / "model", cfg)
    bundle = read_bundle(tmp_path / "model")
    # make_dataset's tiles are textures at random phase: not aligned, so no reference file
    assert bundle.config.anomaly_map.reference == "none" and not (tmp_path / "model" / REFERENCE).exists()
    assert bundle.config.measured.alignment[CATEGORY] >= ALIGNED_BELOW


def test_info_says_the_map_uses_a_reference(invoke, reference_bundle):
    result = invoke("info", reference_bundle)
    assert result.exit_code == 0, result.output
    assert "normal reference" in " ".join(result.stdout.split())
