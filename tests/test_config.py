"""Configuration as plain data: JSON round trip, strict reading, presets, config files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from decodiff_cli.config import (
    FORMAT_VERSION,
    AutoencoderConfig,
    CorrectionConfig,
    DenoiserConfig,
    LatentScaling,
    MapConfig,
    ModelConfig,
    PreprocessConfig,
    ScheduleConfig,
    TrainConfig,
)
from decodiff_cli.presets import OPTION_FIELDS, PRESETS, build_config, read_config_file


def _custom() -> ModelConfig:
    return ModelConfig(
        preprocess=PreprocessConfig(image_size=128, resize=144),
        schedule=ScheduleConfig(num_timesteps=20),
        correction=CorrectionConfig(start_step=6, num_calls=3, strategy="z0"),
        anomaly_map=MapConfig(combine="arithmetic", pixel_clip=0.3, pixel_sigma=2.0, latent_clip=0.2, latent_sigma=0.5),
        latent_scaling=LatentScaling(kind="channel", mean=[0.1, -0.2, 0.3], std=[1.5, 0.5, 2.0]),
        autoencoder=AutoencoderConfig(spec="/x/vae", kind="kl", architecture={"config": {"block_out_channels": [8, 16],
                                      "latent_channels": 3, "nested": {"a": [1, 2]}}}, latent_channels=3, downsample=2),
        denoiser=DenoiserConfig(size="s", latent_channels=3, latent_size=64, num_classes=4),
        train=TrainConfig(batch_size=7, lr=2e-4, patch_sizes=[1, 2], patch_probs=[0.4, 0.6], hflip=True, seed=42),
        categories=["bottle", "cable", "tile", "wood"],
        decodiff_version="9.9.9",
    )


# --------------------------------------------------------------------------- round trip


def test_model_config_round_trips_through_json():
    cfg = _custom()
    data = json.loads(json.dumps(cfg.to_dict()))
    back = ModelConfig.from_dict(data)
    assert back == cfg
    assert isinstance(back.preprocess, PreprocessConfig)
    assert isinstance(back.train, TrainConfig)
    assert isinstance(back.latent_scaling, LatentScaling)
    assert back.to_dict() == cfg.to_dict()
    assert back.correction.timesteps() == [6, 3, 0]


def test_default_config_round_trips_and_has_every_section():
    d = ModelConfig().to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert d["format_version"] == FORMAT_VERSION == 2
    assert ModelConfig.from_dict(d) == ModelConfig()


def test_missing_keys_take_their_defaults():
    cfg = ModelConfig.from_dict({"denoiser": {"size": "tiny"}})
    assert cfg.denoiser == DenoiserConfig(size="tiny")
    assert cfg.preprocess == PreprocessConfig()
    assert cfg.format_version == FORMAT_VERSION


def test_defaults_follow_the_method():
    cfg = ModelConfig()
    assert cfg.schedule == ScheduleConfig(num_timesteps=10, kind="squaredcos_cap_v2")
    assert cfg.correction.timesteps() == [8, 6, 4, 2, 0] and cfg.correction.strategy == "z_{t-1}"
    assert (cfg.anomaly_map.combine, cfg.anomaly_map.pixel_clip, cfg.anomaly_map.pixel_sigma) == ("geometric", 0.4, 3.0)
    assert cfg.anomaly_map.latent_sigma == 1.0
    assert (cfg.train.mask_ratio_max, cfg.train.shuffle_ratio_max) == (0.7, 0.3)


@pytest.mark.parametrize(
    "data,where",
    [
        ({"bogus": 1}, "config: unknown keys bogus"),
        ({"train": {"lr": 1e-3, "momentum": 0.9}}, "config.train: unknown keys momentum"),
        ({"anomaly_map": {"blur": 2, "alpha": 1}}, "config.anomaly_map: unknown keys alpha, blur"),
    ],
)
def test_unknown_keys_are_errors_naming_where(data, where):
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dict(data)
    assert where in str(info.value)


def test_a_section_that_is_not_an_object_is_an_error():
    with pytest.raises(ValueError, match="config.preprocess: expected an object, got list"):
        ModelConfig.from_dict({"preprocess": [256, 256]})


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 100, "1", 1.5])
def test_unknown_format_version_is_refused(version):
    with pytest.raises(ValueError, match="format version") as info:
        ModelConfig.from_dict({"format_version": version})
    assert "upgrade decodiff" in str(info.value)


def test_preprocess_validation():
    with pytest.raises(ValueError, match="resize"):
        PreprocessConfig(image_size=256, resize=200)
    with pytest.raises(ValueError):
        PreprocessConfig(image_size=4, resize=4)
    with pytest.raises(ValueError):  # validated when read back, too
        ModelConfig.from_dict({"preprocess": {"image_size": 256, "resize": 128}})


# ---------------------------------------------------------------------------- presets


def test_paper_preset_values():
    cfg = build_config("paper", {})
    assert (cfg.preprocess.image_size, cfg.preprocess.resize) == (256, 288)
    assert cfg.anomaly_map.latent_clip == 0.2
    assert cfg.anomaly_map.pixel_clip == 0.4 and cfg.anomaly_map.combine == "geometric"
    assert (cfg.latent_scaling.kind, cfg.latent_scaling.factor) == ("factor", 0.18215)
    assert cfg.autoencoder.spec == "stabilityai/sd-vae-ft-ema"
    assert cfg.denoiser.size == "l"
    t = cfg.train
    assert (t.batch_size, t.lr, t.epochs, t.ema_decay, t.weight_decay) == (128, 1e-4, 800, 0.0, 1e-4)
    assert t.patch_sizes == [1, 2, 4, 8]  # at 256 px (docs/method.md 3.2, corrected: {1,2,4,8,16} came from a fork)
    assert t.patch_probs == pytest.approx([0.40, 0.30, 0.20, 0.10])
    assert sum(t.patch_probs) == pytest.approx(1.0)
    assert cfg.correction.timesteps() == [8, 6, 4, 2, 0]


def test_cpu_preset_differs_from_the_method_defaults_only_where_measured():
    cpu, method = build_config("cpu", {}), ModelConfig()
    assert cpu.anomaly_map.combine == "arithmetic" and cpu.denoiser.attention == [False, True, True]
    assert cpu.anomaly_map.reference == "auto" and method.anomaly_map.reference == "none"
    assert cpu.anomaly_map.features and not method.anomaly_map.features
    assert cpu.anomaly_map.novelty and not method.anomaly_map.novelty
    assert (cpu.anomaly_map.novelty_weight, method.anomaly_map.novelty_weight) == (pytest.approx(2 / 3), 0.5)
    assert cpu.anomaly_map.novelty_positions and not method.anomaly_map.novelty_positions
    assert (cpu.anomaly_map.score_top_fraction, method.anomaly_map.score_top_fraction) == (0.01, 0.0)  # 0: the maximum
    assert cpu.correction.timesteps() == [8, 0] and method.correction.timesteps() == [8, 6, 4, 2, 0]
    assert cpu.preprocess.auto_shape and not method.preprocess.auto_shape
    assert (cpu.train.shuffle_ratio_max, method.train.shuffle_ratio_max) == (1.0, 0.3)
    assert (cpu.train.mask_ratio_max, method.train.mask_ratio_max) == (0.9, 0.7)
    assert (cpu.latent_scaling.kind, method.latent_scaling.kind) == ("pooled", "channel")
    cpu.correction, cpu.preprocess.auto_shape, cpu.latent_scaling = method.correction, False, method.latent_scaling
    cpu.train.shuffle_ratio_max, cpu.train.mask_ratio_max = method.train.shuffle_ratio_max, method.train.mask_ratio_max
    cpu.anomaly_map.combine, cpu.denoiser.attention = method.anomaly_map.combine, method.denoiser.attention
    cpu.anomaly_map.reference, cpu.anomaly_map.features = method.anomaly_map.reference, method.anomaly_map.features
    cpu.anomaly_map.novelty, cpu.anomaly_map.novelty_weight = method.anomaly_map.novelty, method.anomaly_map.novelty_weight
    cpu.anomaly_map.novelty_positions = method.anomaly_map.novelty_positions
    cpu.anomaly_map.score_top_fraction = method.anomaly_map.score_top_fraction
    assert cpu == method
    assert set(PRESETS) == {"cpu", "paper"}


def test_a_model_size_option_drops_the_presets_attention_layout():
    assert build_config("cpu", {"model_size": "tiny"}).denoiser.attention == []
    assert build_config("cpu", {"model_size": "xs"}).denoiser.attention == [False, True, True]


@pytest.mark.parametrize("preset,size,resize", [("paper", 384, 432), ("paper", 512, 576), ("paper", 128, 144),
                                                  ("cpu", 128, 128), ("cpu", 64, 64)])
def test_image_size_implies_resize_by_the_preset_ratio(preset, size, resize):
    cfg = build_config(preset, {"image_size": size})
    assert (cfg.preprocess.image_size, cfg.preprocess.resize) == (size, resize)


def test_explicit_resize_wins():
    cfg = build_config("paper", {"image_size": 384, "resize": 400})
    assert (cfg.preprocess.image_size, cfg.preprocess.resize) == (384, 400)
    cfg = build_config("paper", {"resize": 300})
    assert (cfg.preprocess.image_size, cfg.preprocess.resize) == (256, 300)


def test_options_override_fields_and_none_is_ignored():
    cfg = build_config("paper", {"model_size": "tiny", "batch_size": 4, "lr": None, "seed": 3, "autoencoder": "pixel",
                                 "time_budget": 2.5, "hflip": True, "overwrite": True})
    assert cfg.denoiser.size == "tiny" and cfg.train.batch_size == 4 and cfg.train.seed == 3
    assert cfg.train.lr == 1e-4  # None: keep the preset's
    assert cfg.autoencoder.spec == "pixel"
    assert cfg.train.time_budget_minutes == 2.5 and cfg.train.hflip is True
    # presets are built fresh: nothing leaks into the next call
    assert build_config("paper", {}).denoiser.size == "l"


def test_build_config_errors():
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        build_config("fast", {})
    with pytest.raises(ValueError, match="mixed-precision"):
        build_config("cpu", {"mixed_precision": "fp8"})
    with pytest.raises(ValueError, match="batch-size"):
        build_config("cpu", {"batch_size": 0})
    with pytest.raises(ValueError, match="resize"):
        build_config("cpu", {"image_size": 256, "resize": 128})


# ------------------------------------------------------------------------ config files


def test_read_toml_config_file(tmp_path):
    f = tmp_path / "fit.toml"
    f.write_text('preset = "paper"\nimage-size = 384\nmodel_size = "s"\nbatch-size = 8\nhflip = true\n')
    values = read_config_file(f)
    assert values == {"preset": "paper", "image_size": 384, "model_size": "s", "batch_size": 8, "hflip": True}
    cfg = build_config(values.pop("preset"), values)
    assert (cfg.preprocess.image_size, cfg.preprocess.resize, cfg.denoiser.size, cfg.train.batch_size) == (384, 432, "s", 8)


def test_latent_scaling_from_a_config_file(tmp_path):
    f = tmp_path / "fit.toml"
    f.write_text('latent_scaling = "channel"\n')
    assert build_config("cpu", read_config_file(f)).latent_scaling.kind == "channel"
    with pytest.raises(ValueError, match="latent_scaling must be one of channel, pooled"):
        build_config("cpu", {"latent_scaling": "per-pixel"})


def test_toml_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "fit.toml"
    f.write_text('image_size = 256\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match="unknown option\\(s\\) learning_rate") as info:
        read_config_file(f)
    assert str(f) in str(info.value)
    assert "lr" in str(info.value)  # the known options are listed


def test_invalid_toml_is_an_error(tmp_path):
    f = tmp_path / "fit.toml"
    f.write_text("image_size = = 3\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        read_config_file(f)


def test_every_option_maps_to_a_real_field():
    cfg = ModelConfig()
    for option, (section, name) in OPTION_FIELDS.items():
        assert name in {f.name for f in dataclasses.fields(getattr(cfg, section))}, option


def test_patch_sizes_from_a_config_file(tmp_path):
    file = tmp_path / "fit.toml"
    file.write_text("patch_sizes = [1, 2, 4, 8, 16]\nema_decay = 0.99\nmap = 'geometric'\nmap-reference = 'none'\n")
    cfg = build_config("cpu", read_config_file(file))
    assert (cfg.anomaly_map.combine, cfg.anomaly_map.reference) == ("geometric", "none")
    assert cfg.train.patch_sizes == [1, 2, 4, 8, 16] and cfg.train.ema_decay == 0.99
    assert cfg.train.patch_probs == pytest.approx([0.2] * 5)  # sizes alone: equally likely
    with pytest.raises(ValueError, match="patch_sizes"):
        build_config("cpu", {"patch_sizes": [1, 2], "patch_probs": [1.0]})
    with pytest.raises(ValueError, match="patch_sizes"):
        build_config("cpu", {"patch_sizes": [0, 2]})


def test_mixed_precision_auto_follows_the_hardware(monkeypatch):
    from decodiff_cli.fitting import resolve_mixed_precision

    assert build_config("cpu", {"mixed_precision": "auto"}).train.mixed_precision == "auto"
    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert resolve_mixed_precision("auto") == "no"


def test_inference_dtype_auto_follows_the_hardware(monkeypatch):
    from decodiff_cli.autoencoders.pixel import PixelAutoencoder
    from decodiff_cli.denoiser import Denoiser
    from decodiff_cli.model import DecoDiffModel

    from conftest import tiny_config

    cfg = tiny_config()
    cfg.denoiser.latent_channels = 192

    def model(dtype):
        return DecoDiffModel(cfg, PixelAutoencoder(), Denoiser(cfg.denoiser), "cpu", dtype)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert model("auto").dtype == "bf16" and model("fp32").dtype == "fp32"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert model("auto").dtype == "fp32"
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        model("fp8")


def test_pooled_scaling_keeps_each_channels_mean_and_shares_one_spread():
    from decodiff_cli.latents import LatentScaler, fit_scaling

    g = torch.Generator().manual_seed(0)
    raw = torch.randn(6, 3, 4, 5, generator=g) * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -2.0, 0.0]).view(1, 3, 1, 1)
    own, pooled = fit_scaling(raw, "channel"), fit_scaling(raw, "pooled")
    assert pooled.kind == "pooled" and pooled.mean == own.mean
    assert pooled.std == pytest.approx([(sum(s**2 for s in own.std) / 3) ** 0.5] * 3)
    z = LatentScaler(pooled).normalize(raw)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # each channel centred
    assert z.transpose(0, 1).flatten(1).var(dim=1).mean() == pytest.approx(1.0, abs=1e-5)  # unit on average, not each
    assert torch.allclose(LatentScaler(pooled).denormalize(z), raw, atol=1e-5)
    back = ModelConfig.from_dict(dataclasses.replace(ModelConfig(), latent_scaling=pooled).to_dict())
    assert back.latent_scaling == pooled
