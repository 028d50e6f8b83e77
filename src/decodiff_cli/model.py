"""The inference path in one place: tensor -> latent -> corrected latent -> anomaly map.

``DecoDiffModel`` holds the frozen autoencoder, the latent scaler and the denoiser, and
runs a batch through encode -> deviation correction -> decode -> map, timing each stage
(the map's novelty term compares the input latent with the stored normal latents).
``InferenceOptions`` carries what a caller may choose per run, under the same names from
the command line (runs.py) through the Detector to here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

import torch

from decodiff_cli.anomaly_map import MapInputs, anomaly_maps, feature_difference, image_scores, shift_images
from decodiff_cli.autoencoders import Autoencoder
from decodiff_cli.config import ModelConfig
from decodiff_cli.denoiser import Denoiser
from decodiff_cli.deviation import alpha_bars, as_deviation, correct
from decodiff_cli.latents import LatentScaler
from decodiff_cli.novelty import nearest_distance, position_distance

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class InferenceOptions:
    """Per-run choices; None: the bundle's own (its correction steps, calibrated thresholds)."""

    category: str | None = None  # None: from the path, or guessed (Detector)
    steps: int | None = None  # correction steps (denoiser calls; CorrectionConfig.num_calls)
    threshold: float | None = None  # image threshold (Detector)
    pixel_threshold: float | None = None  # (Detector)
    keep_corrected: bool = False  # also return D(z0_hat), the "normal" image


@dataclass
class Inference:
    maps: torch.Tensor  # (N, S, S) in [0, 1], in the model's input geometry
    scores: torch.Tensor  # (N,) image scores (anomaly_map.image_scores: MapConfig.score_top_fraction)
    corrected: torch.Tensor | None  # (N, 3, S, S) in [-1, 1]: D(z0_hat), the "normal" image
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, whole batch
    categories: list[str] | None = None  # per image, when the caller chose them (Detector.infer)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively: a GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere bf16 is emulated and can be slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: absent in some builds
        return False


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but no CUDA device is available; use --device cpu")
    return dev


class DecoDiffModel:
    def __init__(
        self,
        cfg: ModelConfig,
        autoencoder: Autoencoder,
        denoiser: Denoiser,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        reference: torch.Tensor | None = None,
        normal_latents: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if dtype not in DTYPES and dtype != "auto":
            raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        if dtype == "auto":
            dtype = "bf16" if native_bf16(self.device) else "fp32"
        if dtype == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 inference needs a GPU; use bf16 on a CPU")
        self.cfg = cfg
        self.dtype = dtype
        self.autoencoder = autoencoder.to(self.device).eval()
        # On a CPU the autoencoder's full-resolution convolutions are memory-bound: oneDNN
        # is faster in channels-last layout, and a few images at a time stay in cache
        # (batch 8 decodes ~1.5x slower per image than batch 1). A GPU wants whole batches.
        self.on_cpu = self.device.type == "cpu"
        self.autoencoder_chunk = 1 if self.on_cpu else 64
        if self.on_cpu:
            self.autoencoder.to(memory_format=torch.channels_last)
        self.denoiser = denoiser.to(self.device).eval()
        self.scaler = LatentScaler(cfg.latent_scaling)
        self.abar = alpha_bars(cfg.schedule.num_timesteps, cfg.schedule.kind)
        self.reference = reference  # (classes, 2, h, w): see anomaly_map.normal_reference
        # per class name, (M, C) neighbourhood vectors of normal latents (novelty.normal_bank), and
        # under "<name>/positions" its (C + 1, C, h, w) per-position statistics (novelty.position_statistics)
        self.normal_latents = {name: bank.to(self.device, torch.float32) for name, bank in (normal_latents or {}).items()}

    def _autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _chunked(self, fn, x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if self.on_cpu else torch.contiguous_format
        with self._autocast():
            parts = [fn(part.to(self.device).contiguous(memory_format=layout)).float()
                     for part in x.split(self.autoencoder_chunk)]
        return torch.cat(parts).contiguous()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> normalised latents z0 (float32)."""
        return self.scaler.normalize(self._chunked(self.autoencoder.encode, images))

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._chunked(self.autoencoder.decode, self.scaler.denormalize(z))

    @torch.inference_mode()
    def decode_pairs(self, z0: torch.Tensor, z0_hat: torch.Tensor, features: bool,
                     images: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
        """Decodes each input beside its correction: (reconstructed, corrected, per-level
        decoder-feature differences (N, 1, h_l, w_l) of the map's feature levels, [] unless
        ``features``). Without ``images`` the two images are None and the decoder stops at
        the last feature level. Pairs share a chunk, so that the full-size feature maps can
        be compared and dropped at once."""
        pairs = torch.stack([z0, z0_hat], dim=1).flatten(0, 1)  # z0[0], z0_hat[0], z0[1], ...
        layout = torch.channels_last if self.on_cpu else torch.contiguous_format
        clamp = self.cfg.anomaly_map.pixel_scale != "decoder"  # the paper's pixel term: the decoder's own output
        decode = self.autoencoder.decode if clamp else self.autoencoder.decode_unclamped
        wanted = self.cfg.anomaly_map.feature_levels or None
        decoded, levels = [], []
        for chunk in self.scaler.denormalize(pairs).split(2 * self.autoencoder_chunk):
            with self._autocast():
                chunk = chunk.to(self.device).contiguous(memory_format=layout)
                image, found = (self.autoencoder.decode_with_features(chunk, clamp, images, wanted) if features
                                else (decode(chunk), []))
            if image is not None:
                decoded.append(image.float())
            levels.append([feature_difference(f[0::2], f[1::2]) for f in found])
        differences = [torch.cat(level) for level in zip(*levels)]
        if not decoded:
            return None, None, differences
        both = torch.cat(decoded).contiguous()
        return both[0::2], both[1::2], differences

    def _correct(self, z0: torch.Tensor, class_ids: torch.Tensor | None, steps: int | None) -> torch.Tensor:
        labels = class_ids.to(self.device) if class_ids is not None and self.cfg.denoiser.num_classes else None

        def eps_theta(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                out = self.denoiser(z_t, t, labels).float()
            return as_deviation(out, z_t.float(), t, self.abar, self.cfg.denoiser.prediction)

        correction = self.cfg.correction
        if steps is not None:
            correction = replace(correction, num_calls=steps)
        return correct(eps_theta, z0, self.abar, correction.timesteps(), correction.strategy)

    @torch.inference_mode()
    def correct(self, z0: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised latents -> their corrections z0_hat (on the model's device)."""
        return self._correct(z0.to(self.device), class_ids, None)

    def _reference_rows(self, class_ids: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if self.reference is None or self.cfg.anomaly_map.reference == "none":
            return None
        if class_ids is None:
            if len(self.reference) != 1:
                raise ValueError("this model has a normal reference per class: say which class each image is")
            class_ids = torch.zeros(n, dtype=torch.long)
        return self.reference[class_ids.cpu()].to(self.device)

    def _feature_scales(self, class_ids: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """(N, levels): the normal scale of each feature level for each image's class."""
        if not self.cfg.anomaly_map.features:
            return None
        measured = self.cfg.measured.feature_scales
        missing = [name for name in self.cfg.categories if name not in measured]
        if missing or not self.cfg.categories:
            raise ValueError(f"the map's feature term has no scales for {', '.join(missing) or 'this model'}: "
                             "they are measured at fit time")
        table = torch.tensor([measured[name] for name in self.cfg.categories])
        rows = torch.zeros(n, dtype=torch.long) if class_ids is None else class_ids.cpu()
        return table[rows].to(self.device)

    def _novelty(self, z0: torch.Tensor, class_ids: torch.Tensor | None) -> torch.Tensor | None:
        """(N, windows [+ 1], h, w): each place's distance to the nearest normal latent of its
        image's class per window, then (``novelty_positions``) to the normal latent at its own
        position, in units of that class's normal scales (None when the map has no novelty term)."""
        if not self.cfg.anomaly_map.novelty:
            return None
        names, scales = self.cfg.categories, self.cfg.measured.novelty_scales
        windows, positions = self.cfg.anomaly_map.novelty_windows, self.cfg.anomaly_map.novelty_positions
        missing = [name for name in names if name not in self.normal_latents or name not in scales
                   or (positions and f"{name}/positions" not in self.normal_latents)]
        if missing or not names:
            raise ValueError(f"the map's novelty term has no normal latents for {', '.join(missing) or 'this model'}: "
                             "they are stored at fit time")
        rows = torch.zeros(len(z0), dtype=torch.long) if class_ids is None else class_ids.cpu()
        out = torch.empty(len(z0), len(windows) + positions, *z0.shape[-2:], device=z0.device)
        for index in rows.unique().tolist():
            chosen = (rows == index).to(z0.device)
            name = names[index]
            unit = torch.tensor(scales[name], dtype=torch.float32, device=z0.device).view(1, -1, 1, 1)
            distances = nearest_distance(z0[chosen], self.normal_latents[name], windows=windows)
            if positions:
                at_place = position_distance(z0[chosen], self.normal_latents[f"{name}/positions"])
                distances = torch.cat([distances, at_place[:, None]], dim=1)
            out[chosen] = distances / unit
        return out

    @torch.inference_mode()
    def infer(
        self,
        images: torch.Tensor,
        class_ids: torch.Tensor | None = None,
        options: InferenceOptions | None = None,
        z0: torch.Tensor | None = None,
    ) -> Inference:
        """``class_ids``: the category index of each image (used by a class-conditional
        denoiser and to pick the normal reference); None for a one-class model. ``z0``: the
        images' latents, when the caller has encoded them already."""
        options = options or InferenceOptions()
        maps, corrected, timings = self._maps(images, class_ids, options.steps, options.keep_corrected, z0)
        rows = self._shifted_view_rows(class_ids, len(maps))
        if rows.any():  # the map's shifted view: see MapConfig.shifted_view
            d = max(1, self.cfg.autoencoder.downsample // 2)
            ids = None if class_ids is None else class_ids[rows.to(class_ids.device)]
            again, _, more = self._maps(shift_images(images[rows.to(images.device)], d), ids, options.steps, False, None)
            timings = {stage: timings[stage] + more[stage] for stage in timings}
            rows = rows.to(maps.device)
            maps[rows] = (maps[rows] + shift_images(again[:, None], -d)[:, 0]) / 2
        scores = image_scores(maps, self.cfg.anomaly_map.score_top_fraction)
        return Inference(maps=maps.cpu(), scores=scores.cpu(), corrected=corrected.cpu() if options.keep_corrected else None,
                         timings=timings)

    def _shifted_view_rows(self, class_ids: torch.Tensor | None, n: int) -> torch.Tensor:
        """(N,) bool: the images whose class gets the shifted view (no own normal reference)."""
        if not self.cfg.anomaly_map.shifted_view:
            return torch.zeros(n, dtype=torch.bool)
        unaligned = torch.tensor([not self.cfg.has_own_reference(name) for name in self.cfg.categories or [""]])
        return unaligned[torch.zeros(n, dtype=torch.long) if class_ids is None else class_ids.cpu()]

    def _maps(self, images, class_ids, steps, keep_corrected, z0) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """image -> latent -> corrected latent -> (N, S, S) maps, the decoded corrections, and
        the seconds each stage took."""
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            self._sync()
            now = time.perf_counter()
            timings[stage] = now - clock
            clock = now

        z0 = self.encode(images) if z0 is None else z0.to(self.device)  # callers may have encoded already
        lap("encode")
        z0_hat = self._correct(z0, class_ids, steps)
        lap("denoiser")

        reconstructed = corrected = features = None
        terms = self.cfg.anomaly_map.correction_terms()
        if "pixel" in terms or "features" in terms:
            reconstructed, corrected, features = self.decode_pairs(z0, z0_hat, "features" in terms, "pixel" in terms)
        if keep_corrected and corrected is None:
            corrected = self.decode(z0_hat)
        lap("decode")

        inputs = MapInputs(z0, z0_hat, tuple(images.shape[-2:]), reconstructed, corrected,
                           reference=self._reference_rows(class_ids, len(z0)), features=features,
                           feature_scales=self._feature_scales(class_ids, len(z0)), novelty=self._novelty(z0, class_ids))
        maps = anomaly_maps(inputs, self.cfg.anomaly_map)
        lap("map")
        return maps, corrected, timings
