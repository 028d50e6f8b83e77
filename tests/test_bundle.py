"""The model bundle: round trip, integrity checks, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from decodiff_cli import bundle as bundle_mod
from decodiff_cli.autoencoders import describe
from decodiff_cli.autoencoders.pixel import PixelAutoencoder
from decodiff_cli.bundle import (
    AUTOENCODER,
    CALIBRATION,
    CHECKSUMS,
    CONFIG,
    DENOISER,
    TRAINING_LOG,
    BundleError,
    is_bundle,
    load_networks,
    read_bundle,
    verify_checksums,
    write_bundle,
    write_calibration,
)
from decodiff_cli.config import DenoiserConfig, MapConfig, ModelConfig, PreprocessConfig
from decodiff_cli.denoiser import Denoiser
from decodiff_cli.latents import fit_scaling
from decodiff_cli.model import DecoDiffModel

from conftest import as_format_1

CALIB = {"version": 1, "categories": {"tile": {"image_threshold": 0.5, "pixel_threshold": 0.4}}}


def _images(n=2, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _config() -> ModelConfig:
    pixel = PixelAutoencoder()
    cfg = ModelConfig(
        preprocess=PreprocessConfig(image_size=64, resize=64),
        autoencoder=describe(pixel, "pixel"),
        denoiser=DenoiserConfig(size="tiny", latent_channels=192, latent_size=8),
        anomaly_map=MapConfig(latent_clip=0.5),
        categories=["tile"],
    )
    cfg.correction.num_calls = 2
    cfg.latent_scaling = fit_scaling(pixel.encode(_images(6, seed=1)))
    return cfg


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = _config()
    denoiser = Denoiser(cfg.denoiser)
    with torch.no_grad():  # make the output depend visibly on every weight
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, denoiser.eval()


@pytest.fixture(scope="module")
def written(parts, tmp_path_factory):
    cfg, denoiser = parts
    log = tmp_path_factory.mktemp("log") / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n')
    out = tmp_path_factory.mktemp("bundles") / "model"
    write_bundle(out, cfg, denoiser.state_dict(), {}, CALIB, training_log=log)
    return out


@pytest.fixture
def copy(written, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(written, target)
    return target


def _rechecksum(path: Path) -> None:
    bundle_mod._write_checksums(path)


# ---------------------------------------------------------------------------- round trip


def test_round_trip_gives_identical_weights_and_outputs(parts, written):
    cfg, denoiser = parts
    assert is_bundle(written)
    b = read_bundle(written)
    assert b.config == cfg
    assert b.calibration == CALIB
    assert set(b.files()) == {CONFIG, CALIBRATION, CHECKSUMS, DENOISER, TRAINING_LOG}  # no autoencoder file for pixel
    assert (written / TRAINING_LOG).read_text() == '{"step": 1, "loss": 0.5}\n'
    ae, den, _ = load_networks(b)
    assert isinstance(ae, PixelAutoencoder)
    assert not den.training
    original, loaded = denoiser.state_dict(), den.state_dict()
    assert set(original) == set(loaded)
    for k in original:
        assert torch.equal(original[k], loaded[k]), k

    images = _images(2, seed=3)
    a = DecoDiffModel(cfg, PixelAutoencoder(), denoiser).infer(images)
    r = DecoDiffModel(b.config, ae, den).infer(images)
    assert a.maps.shape == (2, 64, 64)
    assert float(a.maps.max()) > 0  # a non-trivial check
    assert torch.equal(a.maps, r.maps)
    assert torch.equal(a.scores, r.scores)


def test_written_json_is_plain_and_checksums_list_every_file(parts, written):
    config = json.loads((written / CONFIG).read_text())
    assert config == parts[0].to_dict()
    assert config["format_version"] == 2
    sums = json.loads((written / CHECKSUMS).read_text())
    assert set(sums) == {CONFIG, CALIBRATION, DENOISER, TRAINING_LOG}
    import hashlib

    for name, digest in sums.items():
        assert hashlib.sha256((written / name).read_bytes()).hexdigest() == digest
    # nothing left next to it
    assert [p.name for p in written.parent.iterdir()] == ["model"]


def test_refuses_to_overwrite_unless_asked(parts, copy):
    cfg, denoiser = parts
    before = (copy / DENOISER).read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(copy, cfg, denoiser.state_dict(), {}, {"replaced": True})
    assert (copy / DENOISER).read_bytes() == before
    assert read_bundle(copy).calibration == CALIB
    write_bundle(copy, cfg, denoiser.state_dict(), {}, {"replaced": True}, overwrite=True)
    b = read_bundle(copy)
    assert b.calibration == {"replaced": True}
    assert not (copy / TRAINING_LOG).exists()  # a fresh bundle, not a merge
    assert sorted(p.name for p in copy.parent.iterdir()) == ["model"]  # no .old / .tmp left


# ------------------------------------------------------------------------- integrity


def test_one_altered_byte_fails_the_checksum_naming_the_file(copy):
    data = bytearray((copy / DENOISER).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / DENOISER).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=DENOISER) as info:
        read_bundle(copy)
    assert "checksum" in str(info.value)
    read_bundle(copy, verify=False)  # the check is what refuses it


def test_altered_config_fails_the_checksum(copy):
    cfg = json.loads((copy / CONFIG).read_text())
    cfg["anomaly_map"]["pixel_clip"] = 0.3
    (copy / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=CONFIG):
        read_bundle(copy)


@pytest.mark.parametrize("name", [DENOISER, CALIBRATION, TRAINING_LOG])
def test_missing_file_is_a_bundle_error(copy, name):
    (copy / name).unlink()
    with pytest.raises(BundleError, match=name):
        read_bundle(copy)


def test_missing_or_broken_checksums(copy):
    sums = json.loads((copy / CHECKSUMS).read_text())
    (copy / CHECKSUMS).write_text("[1, 2]")
    with pytest.raises(BundleError, match="object"):
        read_bundle(copy)
    (copy / CHECKSUMS).write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        read_bundle(copy)
    del sums[DENOISER]
    (copy / CHECKSUMS).write_text(json.dumps(sums))
    with pytest.raises(BundleError, match=DENOISER):
        read_bundle(copy)
    (copy / CHECKSUMS).unlink()
    with pytest.raises(BundleError, match=CHECKSUMS):
        read_bundle(copy)


def test_checksum_names_cannot_leave_the_bundle(copy, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    sums = json.loads((copy / CHECKSUMS).read_text())
    sums["../outside.txt"] = bundle_mod._sha256(outside)
    (copy / CHECKSUMS).write_text(json.dumps(sums))
    with pytest.raises(BundleError, match="outside"):
        verify_checksums(copy)


def test_truncated_safetensors_is_a_bundle_error(copy):
    data = (copy / DENOISER).read_bytes()
    (copy / DENOISER).write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match=DENOISER):
        read_bundle(copy)  # caught by the checksum first
    _rechecksum(copy)  # ... and, with matching checksums, by the reader
    b = read_bundle(copy)
    with pytest.raises(BundleError, match="safetensors"):
        load_networks(b)


def test_garbage_safetensors_is_a_bundle_error(copy):
    (copy / DENOISER).write_bytes(b"\xff" * 64)
    _rechecksum(copy)
    with pytest.raises(BundleError, match=DENOISER):
        load_networks(read_bundle(copy))


def test_denoiser_of_another_size_is_a_bundle_error(copy):
    cfg = json.loads((copy / CONFIG).read_text())
    cfg["denoiser"]["latent_channels"] = 48
    (copy / CONFIG).write_text(json.dumps(cfg))
    _rechecksum(copy)
    with pytest.raises(BundleError, match="do not match the architecture"):
        load_networks(read_bundle(copy))


def test_unknown_config_key_is_a_clear_value_error(copy):
    cfg = json.loads((copy / CONFIG).read_text())
    cfg["correction"]["temperature"] = 0.7
    (copy / CONFIG).write_text(json.dumps(cfg))
    _rechecksum(copy)
    with pytest.raises(ValueError, match="unknown keys temperature") as info:
        read_bundle(copy)
    assert "correction" in str(info.value)


@pytest.mark.parametrize("version", [3, 99])
def test_future_format_version_is_a_clear_value_error(copy, version):
    cfg = json.loads((copy / CONFIG).read_text())
    cfg["format_version"] = version
    (copy / CONFIG).write_text(json.dumps(cfg))
    _rechecksum(copy)
    with pytest.raises(ValueError, match=f"format version {version} is newer") as info:
        read_bundle(copy)
    assert "upgrade" in str(info.value)


def test_a_format_1_config_is_converted_on_read(copy):
    """decodiff 0.2.0 kept what fit measured among the settings; it moves into ``measured``."""
    cfg = json.loads((copy / CONFIG).read_text())
    cfg["measured"] = {"alignment": {"a": 0.3}, "feature_scales": {"a": [1.0, 2.0]}, "novelty_scales": {"a": 0.5},
                       "class_centroids": {"a": [0.1, 0.2]}}
    old = as_format_1(cfg)
    assert "measured" not in old and old["anomaly_map"]["alignment"] == {"a": 0.3}
    (copy / CONFIG).write_text(json.dumps(old))
    _rechecksum(copy)
    config = read_bundle(copy).config
    assert config.to_dict() == {**cfg, "format_version": 2}
    assert config.measured.novelty_scales == {"a": 0.5} and config.measured.class_centroids == {"a": [0.1, 0.2]}


def test_config_that_is_not_json_is_a_bundle_error(copy):
    (copy / CONFIG).write_text("{ nope")
    _rechecksum(copy)
    with pytest.raises(BundleError, match="JSON"):
        read_bundle(copy)


def test_read_bundle_on_a_non_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a decodiff bundle"):
        read_bundle(tmp_path)
    with pytest.raises(BundleError, match="not a decodiff bundle"):
        read_bundle(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BundleError, match="not a decodiff bundle"):
        read_bundle(tmp_path / "file.txt")
    assert not is_bundle(tmp_path)


# ----------------------------------------------------------------- embedded autoencoder


def _tiny_kl(latent_channels: int):
    from diffusers import AutoencoderKL

    from decodiff_cli.autoencoders.diffusers_vae import DiffusersAutoencoder

    torch.manual_seed(latent_channels)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
    )
    return DiffusersAutoencoder("kl", vae)


def test_embedded_autoencoder_round_trip_and_wrong_shape(tmp_path):
    ae4, ae8 = _tiny_kl(4), _tiny_kl(8)
    cfg = ModelConfig(
        preprocess=PreprocessConfig(image_size=16, resize=16),
        autoencoder=describe(ae4, "tiny-kl"),
        denoiser=DenoiserConfig(size="tiny", latent_channels=4, latent_size=8),
    )
    den_state = Denoiser(cfg.denoiser).state_dict()
    good = write_bundle(tmp_path / "good", cfg, den_state, ae4.state_dict(), {})
    assert (good / AUTOENCODER).is_file()
    ae, _, _ = load_networks(read_bundle(good))
    for k, v in ae4.state_dict().items():
        assert torch.equal(ae.state_dict()[k], v), k

    bad = write_bundle(tmp_path / "bad", cfg, den_state, ae8.state_dict(), {})  # 8 latent channels vs 4
    with pytest.raises(BundleError, match=AUTOENCODER) as info:
        load_networks(read_bundle(bad))
    assert "do not match" in str(info.value)

    missing = write_bundle(tmp_path / "missing", cfg, den_state, {}, {})  # weights never written
    with pytest.raises(BundleError, match=f"{AUTOENCODER} is missing"):
        load_networks(read_bundle(missing))


# ------------------------------------------------------------------------- calibration


def test_write_calibration_keeps_the_bundle_verifiable(copy):
    new = {"version": 1, "categories": {"tile": {"image_threshold": 0.9, "pixel_threshold": 0.8}}}
    write_calibration(copy, new)
    verify_checksums(copy)
    assert read_bundle(copy).calibration == new
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []


def test_write_calibration_refuses_an_altered_bundle(copy):
    data = bytearray((copy / DENOISER).read_bytes())
    data[-1] ^= 0xFF
    (copy / DENOISER).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=DENOISER):
        write_calibration(copy, {"x": 1})
    assert json.loads((copy / CALIBRATION).read_text()) == CALIB


# ----------------------------------------------------------------------------- crashes


def test_crash_while_writing_leaves_nothing(parts, tmp_path, monkeypatch):
    cfg, denoiser = parts

    def boom(path, state):
        (Path(path)).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod, "_save_tensors", boom)
    out = tmp_path / "sub" / "model"
    with pytest.raises(OSError, match="disk full"):
        write_bundle(out, cfg, denoiser.state_dict(), {}, CALIB)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary folder either


def test_crash_while_overwriting_keeps_the_old_bundle(parts, copy, monkeypatch):
    cfg, denoiser = parts
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    monkeypatch.setattr(bundle_mod, "_save_tensors", lambda path, state: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        write_bundle(copy, cfg, denoiser.state_dict(), {}, {"new": 1}, overwrite=True)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["model"]
    read_bundle(copy)
