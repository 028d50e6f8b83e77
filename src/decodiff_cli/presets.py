"""Named starting settings, and fit options (command line or --config file) -> ModelConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from decodiff_cli.config import (
    AutoencoderConfig,
    CorrectionConfig,
    DenoiserConfig,
    LATENT_SCALINGS,
    LatentScaling,
    MapConfig,
    ModelConfig,
    PREDICTIONS,
    PreprocessConfig,
    TrainConfig,
    parse_image_size,
)


def _cpu() -> ModelConfig:
    """Defaults for a laptop-class CPU: a 16M-parameter UNet, EMA, a higher lr. Self-attention
    at the finest (32x32) level costs 40% of a CPU training step; the coarser levels keep it."""
    return ModelConfig(
        # Elongated images keep their shape (`--image-size auto`): docs/results.md, "Image shape and tiles".
        preprocess=PreprocessConfig(auto_shape=True),
        denoiser=DenoiserConfig(size="xs", attention=[False, True, True]),
        # The arithmetic mean, the "auto" reference, the feature and novelty terms (weighed
        # 2:1) and the top-1% score each measured better with small autoencoders on the
        # same weights; the figures are in docs/results.md.
        # The novelty term also at each position: the tiles' blowholes and bottle's small breaks
        # rise above the trivial baseline (docs/results.md, "The covariance at each position").
        anomaly_map=MapConfig(combine="arithmetic", reference="auto", features=True, novelty=True,
                              novelty_weight=2 / 3, novelty_positions=True, score_top_fraction=0.01),
        # Two model calls (t = 8, 0) instead of five: within .001 of five on every metric on
        # the same weights, 0.24 s less per image on one CPU thread (docs/results.md).
        correction=CorrectionConfig(num_calls=2),
        # Up to all (not 30%) of the noised patches filled with another place's latent patch,
        # and up to 90% (not 70%) of the patches noised: each gains the correction map alone
        # on both sets (docs/results.md, "Every noised patch shuffled at 1,000 steps", "The
        # share of noised patches").
        train=TrainConfig(shuffle_ratio_max=1.0, mask_ratio_max=0.9),
        # One spread for all 32 TAEF2 channels, not one each (they differ up to 3.3x): at 1,000
        # steps the mix and the correction alone gain on both sets (docs/results.md, "One pooled
        # latent spread at 1,000 steps").
        latent_scaling=LatentScaling(kind="pooled"),
    )


def paper_patch_sizes(image_size: int) -> tuple[list[int], list[float]]:
    """The authors' patch sizes (latent pixels, 8x downsampling) and their probabilities for
    an input side (docs/method.md 3.2): a fifth, larger size (a quarter of the latent side) only
    from 384 px up."""
    if image_size < 384:
        return [1, 2, 4, 8], [0.40, 0.30, 0.20, 0.10]
    return [1, 2, 4, 8, image_size // 32], [0.30, 0.25, 0.20, 0.15, 0.10]


def _paper() -> ModelConfig:
    """The authors' setting (docs/method.md 1-6): SD-VAE, the 256-wide UNet, batch 128, 800 epochs."""
    sizes, probs = paper_patch_sizes(256)
    return ModelConfig(
        preprocess=PreprocessConfig(image_size=256, resize=288),
        anomaly_map=MapConfig(latent_clip=0.2, pixel_scale="decoder"),
        latent_scaling=LatentScaling(kind="factor", factor=0.18215),
        autoencoder=AutoencoderConfig(spec="stabilityai/sd-vae-ft-ema"),
        denoiser=DenoiserConfig(size="l"),
        train=TrainConfig(batch_size=128, lr=1e-4, weight_decay=1e-4, epochs=800, ema_decay=0.0, mixed_precision="no",
                          lr_per_epoch=True, warmup_epochs=10, warmup_steps=0, cosine_horizon=1.5, lr_floor=0.0,
                          exact_mask=True, posterior_samples=True, patch_sizes=sizes, patch_probs=probs),
    )


PRESETS = {"cpu": _cpu, "paper": _paper}

# fit option -> (section, field) of ModelConfig
OPTION_FIELDS = {
    "autoencoder": ("autoencoder", "spec"),
    "model_size": ("denoiser", "size"),
    "image_size": ("preprocess", "image_size"),
    "resize": ("preprocess", "resize"),
    "tiles": ("preprocess", "tiles"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "epochs": ("train", "epochs"),
    "max_steps": ("train", "max_steps"),
    "time_budget": ("train", "time_budget_minutes"),
    "seed": ("train", "seed"),
    "ema_decay": ("train", "ema_decay"),
    "warmup_steps": ("train", "warmup_steps"),
    "warmup_epochs": ("train", "warmup_epochs"),
    "lr_per_epoch": ("train", "lr_per_epoch"),
    "cosine_horizon": ("train", "cosine_horizon"),
    "lr_floor": ("train", "lr_floor"),
    "stop_step": ("train", "stop_step"),
    "views": ("train", "augment_variants"),
    "exact_mask": ("train", "exact_mask"),
    "noised_weight": ("train", "noised_weight"),
    "mask_ratio_max": ("train", "mask_ratio_max"),
    "shuffle_ratio_max": ("train", "shuffle_ratio_max"),
    "posterior_samples": ("train", "posterior_samples"),
    "pixel_scale": ("anomaly_map", "pixel_scale"),
    "patch_sizes": ("train", "patch_sizes"),
    "patch_probs": ("train", "patch_probs"),
    "map_combine": ("anomaly_map", "combine"),
    "map_reference": ("anomaly_map", "reference"),
    "map_features": ("anomaly_map", "features"),
    "map_pixel": ("anomaly_map", "pixel"),
    "feature_levels": ("anomaly_map", "feature_levels"),
    "shifted_view": ("anomaly_map", "shifted_view"),
    "map_novelty": ("anomaly_map", "novelty"),
    "novelty_bank": ("anomaly_map", "novelty_bank"),
    "novelty_weight": ("anomaly_map", "novelty_weight"),
    "novelty_windows": ("anomaly_map", "novelty_windows"),
    "novelty_positions": ("anomaly_map", "novelty_positions"),
    "prediction": ("denoiser", "prediction"),
    "latent_scaling": ("latent_scaling", "kind"),
    "score_top": ("anomaly_map", "score_top_fraction"),
    "mixed_precision": ("train", "mixed_precision"),
    "hflip": ("train", "hflip"),
    "vflip": ("train", "vflip"),
}
FILE_ONLY = {"preset", "class_conditional", "overwrite", "strict", "resume"}


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML (or, with PyYAML installed, YAML) file of fit options."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML needs PyYAML (pip install pyyaml); or use TOML") from None
        data = yaml.safe_load(text) or {}
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of options")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "map" in values:  # the option is --map; its parameter (and key) is map_combine
        values["map_combine"] = values.pop("map")
    unknown = sorted(set(values) - set(OPTION_FIELDS) - FILE_ONLY)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTION_FIELDS))}")
    return values


def build_config(preset: str, options: dict[str, Any]) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    crop_ratio = cfg.preprocess.resize / cfg.preprocess.image_size
    sections: dict[str, dict[str, Any]] = {}
    for option, value in options.items():
        if option in OPTION_FIELDS and value is not None:
            section, name = OPTION_FIELDS[option]
            sections.setdefault(section, {})[name] = value
    pre = sections.get("preprocess", {})
    if str(pre.get("image_size", "")).strip().lower() == "auto":
        pre["image_size"], pre["auto_shape"] = cfg.preprocess.image_size, True
    elif "image_size" in pre:  # 256 or WxH (a CLI string, a config file's number or string)
        pre["image_size"], pre["image_height"] = parse_image_size(pre["image_size"])
        pre["auto_shape"] = False  # a shape the user gave is the shape
        if "resize" not in pre:  # a square keeps the preset's crop; W x H is resized whole
            pre["resize"] = pre["image_size"] if pre["image_height"] else round(pre["image_size"] * crop_ratio)
    if pre.get("resize", cfg.preprocess.resize) > pre.get("image_size", cfg.preprocess.image_size):
        pre["auto_shape"] = False  # a centre crop is square
    if pre.get("tiles"):
        pre["auto_shape"] = False  # a tile's shape is the user's (or the square default)
        if options.get("resize") is None:  # not the preset's crop: tiles are cut, not resized
            pre["resize"] = pre.get("image_size", cfg.preprocess.image_size)
    if sections.get("denoiser", {}).get("size", cfg.denoiser.size) != cfg.denoiser.size:
        sections["denoiser"]["attention"] = []  # the preset's attention layout was for its own size
    for section, values in sections.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    if cfg.denoiser.prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, not {cfg.denoiser.prediction!r}")
    if cfg.latent_scaling.kind not in LATENT_SCALINGS:
        raise ValueError(f"latent_scaling must be one of {', '.join(LATENT_SCALINGS)}, not {cfg.latent_scaling.kind!r}")
    if cfg.train.mixed_precision not in ("no", "fp16", "bf16", "auto"):
        raise ValueError(f"--mixed-precision must be no, fp16, bf16 or auto, not {cfg.train.mixed_precision!r}")
    # A preset's map terms yield to a one-term map; terms named on the command line do not
    # (MapConfig.validate refuses --map-features there).
    if cfg.anomaly_map.combine in ("pixel", "latent"):
        if not options.get("map_features"):
            cfg.anomaly_map.features = False
        cfg.anomaly_map.novelty = bool(options.get("map_novelty"))
    if cfg.autoencoder.spec == "pixel" and options.get("map_novelty") is None:
        # Raw 8x8 pixel blocks are no feature space: nearest distances between them mostly
        # measure where a texture's phase falls (docs/results.md, "The novelty term with the
        # weight-free pixel backend"). Only when asked for.
        cfg.anomaly_map.novelty = False
    cfg.anomaly_map.validate(before_fit=True)
    if preset == "paper" and options.get("patch_sizes") is None:  # the authors' sizes follow the input size
        cfg.train.patch_sizes, cfg.train.patch_probs = paper_patch_sizes(min(cfg.preprocess.shape))
    if cfg.train.lr_per_epoch and options.get("warmup_steps") is not None:
        raise ValueError("warmup_steps: this learning rate changes once per epoch; set its warm-up with warmup_epochs")
    sizes, probs = cfg.train.patch_sizes, cfg.train.patch_probs
    if "patch_sizes" in options and "patch_probs" not in options:
        probs = cfg.train.patch_probs = [1 / len(sizes)] * len(sizes) if sizes else []
    if (not sizes or len(sizes) != len(probs) or any(int(s) != s or s < 1 for s in sizes)
            or any(p < 0 for p in probs) or sum(probs) <= 0):
        raise ValueError(f"patch_sizes {sizes} and patch_probs {probs}: need positive integer sizes and as many "
                         "non-negative probabilities, not all zero")
    for name, option in (("batch_size", "batch-size"), ("augment_variants", "views")):
        if getattr(cfg.train, name) < 1:
            raise ValueError(f"--{option} must be at least 1")
    if cfg.train.stop_step < 0 or cfg.train.warmup_epochs < 0 or cfg.train.warmup_steps < 0:
        raise ValueError("--stop-step, warmup_steps and warmup_epochs cannot be negative")
    if cfg.train.cosine_horizon <= 0 or not 0 <= cfg.train.lr_floor <= 1:
        raise ValueError(f"cosine_horizon must be positive and lr_floor between 0 and 1, not {cfg.train.cosine_horizon} "
                         f"and {cfg.train.lr_floor}")
    return cfg
