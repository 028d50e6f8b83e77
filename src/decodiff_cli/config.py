"""Configuration as plain data.

Every dataclass here is written into a bundle's ``config.json``; a bundle alone says how
to preprocess, correct and score. Defaults follow ``docs/method.md`` (the paper) unless a
comment says why they differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 2  # 2: what fit measured moved from the settings into ModelConfig.measured


@dataclass
class PreprocessConfig:
    """Image file -> tensor. The paper resizes to 288x288 and centre-crops 256."""

    image_size: int = 256  # side of the square the model sees (after the crop); its width if not square
    resize: int = 256  # side the image is first resized to; > image_size means a centre crop
    # Why no crop by default: a crop silently hides defects near the border, which on
    # unaligned parts (tiles, webs) is where many are. `--resize 288` gives the paper's.
    # `--image-size WxH`: the height of a model input that is not square (0: square). The
    # whole image is resized to image_size x image_height, with no crop, so that elongated
    # images (line scans, webs) are not squeezed along their long side.
    image_height: int = 0
    # `--image-size auto` (the cpu preset): `fit` looks at the training images and, when
    # their median aspect ratio is beyond AUTO_SQUARE_WITHIN, sets image_size x image_height
    # to that ratio at about image_size**2 pixels; the bundle keeps the shape it chose.
    auto_shape: bool = False
    # `--tiles`: the input is a tile of image_size x image_height cut from the image at its
    # own resolution (tiles.py), for large images and small defects; no resize, no crop.
    tiles: bool = False

    def __post_init__(self) -> None:
        if self.tiles and self.resize != self.image_size:
            raise ValueError("--tiles cuts the image at its own resolution: it takes no --resize (a crop)")
        if self.image_height:
            if min(self.image_size, self.image_height) < 8:
                raise ValueError(f"image size {self.image_size}x{self.image_height}: both sides must be >= 8")
            if self.resize != self.image_size:
                raise ValueError("--resize (a centre crop) needs a square --image-size")
        elif self.image_size < 8 or self.resize < self.image_size:
            raise ValueError(
                f"resize ({self.resize}) must be >= image size ({self.image_size}) and both >= 8"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return (self.image_height or self.image_size, self.image_size)

    def describe(self) -> str:
        if self.tiles:
            height, width = self.shape
            return f"tiles of {width}x{height} at the image's own resolution, a quarter overlapping"
        if self.image_height:
            return f"resize to {self.image_size}x{self.image_height}, no crop"
        return f"resize {self.resize}, crop {self.image_size}"


AUTO_SQUARE_WITHIN = 1.5  # `auto` keeps a square up to 3:2 either way (2.3:1 and 2.5:1 measured, not this bound)


def auto_shape(aspect: float, side: int, step: int = 32) -> tuple[int, int]:
    """(width, height; 0 for a square) for images of this width/height ratio at about
    side x side pixels, in multiples of `step` (TAEF2's 8 x the denoiser's 4)."""
    if 1 / AUTO_SQUARE_WITHIN <= aspect <= AUTO_SQUARE_WITHIN:
        return side, 0
    width = max(step, round(side * aspect ** 0.5 / step) * step)
    height = max(step, round(side * side / width / step) * step)
    return (width, 0) if width == height else (width, height)


def parse_image_size(value: int | str) -> tuple[int, int]:
    """``--image-size``: 256 (a square) or WxH -> (width, height; 0 for a square).
    (``auto`` is read by the caller: it is a choice, not a shape.)"""
    text = str(value).strip().lower()
    try:
        if "x" in text:
            width, height = (int(part) for part in text.split("x"))
            return (width, 0) if width == height else (width, height)
        return int(text), 0
    except ValueError:
        raise ValueError(f"--image-size must be auto, a number or WxH (e.g. 512x128), not {value!r}") from None


@dataclass
class ScheduleConfig:
    """The noise schedule (docs/method.md section 2)."""

    num_timesteps: int = 10
    kind: str = "squaredcos_cap_v2"


@dataclass
class CorrectionConfig:
    """Deviation correction with deterministic DDIM (docs/method.md section 5)."""

    start_step: int = 8  # t of the first model call
    num_calls: int = 5  # model calls, evenly spaced from start_step down to 0
    strategy: str = "z_{t-1}"  # or "z0" (paper Table 3)

    def timesteps(self) -> list[int]:
        if self.num_calls < 1:
            raise ValueError("the number of correction steps must be at least 1")
        if self.num_calls == 1:
            return [self.start_step]
        span = self.start_step / (self.num_calls - 1)
        steps = [round(self.start_step - i * span) for i in range(self.num_calls)]
        return sorted(set(steps), reverse=True)


COMBINATIONS = ("geometric", "arithmetic", "pixel", "latent")
PIXEL_SCALES = ("unit", "decoder")
REFERENCES = ("none", "position")  # in a bundle
FIT_REFERENCES = REFERENCES + ("auto",)  # as a fit option
ALIGNED_BELOW = 0.6  # "auto": below this anomaly_map.alignment a class is aligned (bottle's and tiles': docs/results.md)


@dataclass
class MapConfig:
    """Discrepancies -> anomaly map (docs/method.md section 6, Eq. 15)."""

    combine: str = "geometric"  # geometric | arithmetic | pixel | latent
    # The pixel term, |D(z0_hat) - D(z0)| in RGB. Off, a map with the feature term needs the
    # decoder only up to its last feature level, not its full-resolution layers (the cpu
    # preset: more than half of the scoring time, docs/results.md).
    pixel: bool = True
    pixel_clip: float = 0.4
    # The scale the pixel difference and its clip are taken on. "decoder": the decoder's own
    # [-1, 1] output, not clamped (the authors' evaluation code, docs/method.md 6); "unit": the
    # output clamped to [-1, 1] and halved to [0, 1] units, where clip 0.4 equals 0.8 on the
    # decoder's scale (what bundles written before this field scored with, and the cpu preset).
    pixel_scale: str = "unit"
    pixel_sigma: float = 3.0  # Gaussian blur, in pixels of the model's input
    latent_clip: float = 0.5  # 0.2 in the paper, for SD-VAE latents * 0.18215; ours are
    # standardised (unit variance), where 0.2 saturates on normal texture.
    latent_sigma: float = 1.0  # in latent pixels
    # Beyond the paper: "position" turns the latent discrepancy into a z-score against its
    # per-position mean and spread on normal training images (stored in the bundle), so
    # places the model always corrects a little (edges, highlights) stop looking anomalous.
    # "none" is the paper's map. "auto" (a fit option, resolved at fit time) uses the
    # reference only for classes whose images are aligned (see anomaly_map.alignment):
    # per-position statistics mean nothing where positions do not correspond.
    reference: str = "none"  # none | position (| auto, before fitting)
    reference_clip: float = 6.0  # in z-score units; replaces latent_clip when reference is on
    # Beyond the paper: a third term, the difference between the decoder's feature maps of
    # the correction and of the input (at each upsampling step), in units of its 99th
    # percentile on normal training images (measured at fit time, per class and level).
    # Decoder features see texture and shape that neither the latent nor the RGB difference
    # weighs well. Needs an autoencoder with a decoder (not the pixel backend).
    features: bool = False
    feature_clip: float = 2.0  # in units of the normal 99th percentile
    feature_levels: int = 0  # the coarsest this many levels; 0: all
    # Beyond the paper: for classes without their own normal reference (unaligned ones),
    # also score a copy of the image shifted by half a latent pixel and average the two
    # maps (the second shifted back). Where the autoencoder's grid falls changes how the
    # correction treats normal texture, not a real defect. Twice the scoring cost for
    # those classes; aligned classes are left alone (their reference does not shift).
    shifted_view: bool = False
    # Beyond the paper: the final map mixes the map above with a novelty term, each
    # place's latent distance to the nearest normal latent (novelty.py), in units of its
    # normal 99th percentile (per class, measured at fit time). The normal latents are
    # stored in the bundle (normal_latents.safetensors).
    novelty: bool = False
    novelty_clip: float = 2.0  # in units of the normal 99th percentile
    # The novelty term's share of the final map (the correction map has the rest).
    novelty_weight: float = 0.5
    # Normal latent vectors kept per class, chosen to cover the training images
    # (novelty.covering): 64k costs ~0.07 s per image on one CPU thread and 4 MiB per class
    # (fp16, 32 latent channels); the cost grows linearly.
    novelty_bank: int = 65536
    # Odd windows (latent pixels) over which each place's latent vector is averaged before
    # the nearest normal one is found; the first makes the term, each further one adds what
    # it has beyond its normal range (anomaly_map.novelty_discrepancy). 1 after 3: a defect of
    # one latent pixel, which the 3x3 average dilutes ninefold, keeps its full distance.
    novelty_windows: list[int] = field(default_factory=lambda: [3])
    # Also each single latent vector against the normal mean and covariance at its own position
    # (novelty.position_statistics), adding what it has beyond its normal range
    # (anomaly_map.novelty_discrepancy): sharp on defects of a latent pixel or two that look
    # like normal texture found elsewhere (docs/results.md, "The covariance at each position").
    novelty_positions: bool = False
    # Beyond the paper: the image score is the mean of the map over its highest
    # ``score_top_fraction`` of pixels; 0 is the map's maximum (the paper's). A mean over
    # an area is steadier than one pixel, and sees defects that are large but faint.
    score_top_fraction: float = 0.0

    def correction_terms(self) -> list[str]:
        """The terms the correction map is the mean of (anomaly_map.TERMS), in order: a
        one-term map ("pixel", "latent") is that term alone."""
        terms = [name for name, wanted in (("pixel", self.pixel and self.combine != "latent"),
                                           ("latent", self.combine != "pixel")) if wanted]
        return terms + ["features"] if self.features else terms

    def validate(self, before_fit: bool = False) -> None:
        """The rules between the map's settings, in one place: checked when fit options are
        resolved (``before_fit``: "auto" is still a reference) and whenever a map is made."""
        if self.combine not in COMBINATIONS:
            raise ValueError(f"--map must be one of {', '.join(COMBINATIONS)}, not {self.combine!r}")
        references = FIT_REFERENCES if before_fit else REFERENCES
        if self.reference not in references:
            raise ValueError(f"unknown map reference {self.reference!r}: --map-reference must be one of "
                             f"{', '.join(references)}")
        if self.pixel_scale not in PIXEL_SCALES:
            raise ValueError(f"pixel_scale must be one of {', '.join(PIXEL_SCALES)}, not {self.pixel_scale!r}")
        if self.features and self.combine in ("pixel", "latent"):
            raise ValueError(f"--map-features: the feature term is a third term of an arithmetic or geometric map, "
                             f"not of --map {self.combine}")
        if not self.pixel and self.combine == "pixel":
            raise ValueError("--no-map-pixel: --map pixel is the pixel term alone")
        if self.feature_levels < 0:
            raise ValueError(f"--feature-levels must be 0 (all) or more, not {self.feature_levels}")
        if self.novelty_bank < 1:
            raise ValueError(f"--novelty-bank must be at least 1, not {self.novelty_bank}")
        windows = self.novelty_windows
        if not windows or len(set(windows)) != len(windows) or any(int(k) != k or k < 1 or k % 2 == 0 for k in windows):
            raise ValueError(f"novelty_windows must be distinct odd window sizes (1, 3, 5...), not {windows}")
        if (len(windows) > 1 or self.novelty_positions) and self.novelty_clip <= 1:
            raise ValueError(f"novelty_clip must be above 1 (the normal range) with several windows or novelty_positions, "
                             f"not {self.novelty_clip}")
        if not 0 <= self.novelty_weight <= 1:
            raise ValueError(f"--novelty-weight must be between 0 and 1, not {self.novelty_weight}")
        if not 0 <= self.score_top_fraction < 1:
            raise ValueError(f"--score-top must be at least 0 and below 1, not {self.score_top_fraction}")


@dataclass
class LatentScaling:
    """How raw autoencoder latents are brought to roughly unit scale."""

    # channel: each channel's mean and spread over the training latents; pooled: each
    # channel's mean, one spread for all (the root mean channel variance); factor | none
    kind: str = "channel"
    factor: float = 1.0
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


@dataclass
class AutoencoderConfig:
    """Which frozen autoencoder, and the architecture needed to rebuild it offline."""

    spec: str = "taef2"  # "taef2" (packaged), "pixel", a hub id, or a local folder or file
    kind: str = ""  # kl | tiny | taesd_folder | pixel (filled in when loaded)
    architecture: dict[str, Any] = field(default_factory=dict)
    latent_channels: int = 0
    downsample: int = 8


PREDICTIONS = ("deviation", "clean")  # DenoiserConfig.prediction
LATENT_SCALINGS = ("channel", "pooled", "factor", "none")  # LatentScaling.kind


@dataclass
class DenoiserConfig:
    size: str = "xs"
    latent_channels: int = 4
    latent_size: int = 32  # the latent's width (its side when square)
    latent_height: int = 0  # 0: square
    num_classes: int = 0  # > 0: class-conditional (unified multi-category model)
    attention: list[bool] = field(default_factory=list)  # per level, fine to coarse; [] = the size's
    # What the network outputs: "deviation", the paper's eps' (Eq. 11), or "clean", the clean
    # latent z0 itself (trained on its squared error; deviation.as_deviation converts it).
    prediction: str = "deviation"

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(height, width) of the latent."""
        return (self.latent_height or self.latent_size, self.latent_size)


@dataclass
class TrainConfig:
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100  # linear warm-up, in optimiser steps (when the lr steps per step)
    # The learning rate: linear warm-up, then a cosine from the peak down to ``lr_floor`` x
    # the peak, reached at ``cosine_horizon`` x the training length. With ``lr_per_epoch``
    # it changes once per epoch and the warm-up is ``warmup_epochs`` epochs (the authors').
    lr_per_epoch: bool = False
    warmup_epochs: int = 0
    cosine_horizon: float = 1.0
    lr_floor: float = 0.1
    epochs: int = 0  # 0: not limiting; an epoch is a full pass, the last, smaller batch included
    max_steps: int = 0  # 0: not limiting (a time-budget fit records the steps it planned here)
    stop_step: int = 0  # > 0: stop after this step, on the schedule of max_steps (replays a fit the clock cut short)
    steps_done: int = 0  # written at fit time: the optimiser steps the model was trained for
    time_budget_minutes: float = 0.0  # 0: not limiting
    ema_decay: float = 0.995
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    seed: int = 0
    augment_variants: int = 4  # encoded views per image: the original + shifted copies (a fit records those encoded)
    max_shift: int = 4  # the paper's random translation, in pixels
    hflip: bool = False
    vflip: bool = False
    holdout_fraction: float = 0.1
    min_holdout: int = 3
    mask_ratio_max: float = 0.7
    # True: exactly floor(N * (1 - r)) of the N patches stay clean (the authors'); False: each
    # patch stays clean with probability 1 - r (the same on average; what the cpu preset measured).
    exact_mask: bool = False
    shuffle_ratio_max: float = 0.3
    # Loss weight of the noised elements against the clean ones (whose target is 0): above 1,
    # the model is pushed harder to find deviations than to leave normal places alone.
    noised_weight: float = 1.0
    # True: train on a fresh sample of the encoder's posterior each step, where the autoencoder
    # has one (KL-VAE; the authors'); False: on its mean, as at test time.
    posterior_samples: bool = False
    patch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    patch_probs: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])


@dataclass
class FitStatistics:
    """What ``fit`` measured on the training images, apart from what the user chose; the
    map and the class guess read these (per class name)."""

    # "auto" reference: how well positions correspond (anomaly_map.alignment); empty when
    # the reference was chosen, not measured
    alignment: dict[str, float] = field(default_factory=dict)
    feature_scales: dict[str, list[float]] = field(default_factory=dict)  # the feature term's units, coarse to fine
    novelty_scales: dict[str, float | list[float]] = field(default_factory=dict)  # the novelty term's unit (per window)
    # the mean normalised training latent pooled over space: a nearest-centroid guess of an
    # image's category when nobody names it (models of several classes)
    class_centroids: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Everything a bundle needs to score: written to ``config.json``."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    anomaly_map: MapConfig = field(default_factory=MapConfig)
    latent_scaling: LatentScaling = field(default_factory=LatentScaling)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    categories: list[str] = field(default_factory=list)
    measured: FitStatistics = field(default_factory=FitStatistics)
    format_version: int = FORMAT_VERSION
    decodiff_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def has_own_reference(self, name: str) -> bool:
        """Whether the map measures class ``name`` against its own normal reference: not
        with reference "none", nor for a class that "auto" measured as unaligned (no
        alignment measured: "position" was asked for, every class has one)."""
        return self.anomaly_map.reference != "none" and self.measured.alignment.get(name, 0.0) < ALIGNED_BELOW

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Rebuild from JSON; unknown keys are an error (a newer writer, or a typo)."""
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"bundle format version {version} is newer than this decodiff understands "
                f"({FORMAT_VERSION}); upgrade decodiff"
            )
        return _build(cls, _upgrade(data) if version < FORMAT_VERSION else data, "config")


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (decodiff 0.2.0 and earlier kept what fit measured among the settings) -> 2: the
    measured fields move into ``measured``; nothing else changes, so scores stay identical."""
    data = {**data, "format_version": FORMAT_VERSION}
    map_cfg = dict(data.get("anomaly_map", {})) if isinstance(data.get("anomaly_map"), dict) else data.get("anomaly_map")
    measured = {}
    if isinstance(map_cfg, dict):
        for key in ("alignment", "feature_scales", "novelty_scales"):
            if key in map_cfg:
                measured[key] = map_cfg.pop(key)
        data["anomaly_map"] = map_cfg
    if "class_centroids" in data:
        measured["class_centroids"] = data.pop("class_centroids")
    data.setdefault("measured", measured)
    return data


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


_DATACLASSES = {
    c.__name__: c
    for c in (
        PreprocessConfig,
        ScheduleConfig,
        CorrectionConfig,
        MapConfig,
        FitStatistics,
        LatentScaling,
        AutoencoderConfig,
        DenoiserConfig,
        TrainConfig,
    )
}
