"""The model bundle: a folder that alone is enough to score, offline, years later.

    config.json              ModelConfig: preprocessing, schedule, sampler, map, scaling,
                             categories, autoencoder source and architecture, denoiser size
    calibration.json         thresholds per category, and the rule that set them
    denoiser.safetensors     eps_theta weights (the EMA weights when EMA was used)
    autoencoder.safetensors  the frozen autoencoder, embedded (absent for `pixel`)
    normal_reference.safetensors  per-class statistics of the correction on normal images
                             (only with the map's `reference` option)
    normal_latents.safetensors    per class, normal latent neighbourhood vectors (only
                             with the map's `novelty` term), and its per-position
                             statistics (with `novelty_positions`)
    training_log.jsonl       one JSON object per logged training step
    checksums.json           sha256 of every file above; verified on load

Loading reads JSON and safetensors only: nothing is unpickled, no code from the bundle runs.
Writing goes to a temporary sibling folder that is renamed into place, so a crash never
leaves a half-written bundle under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decodiff_cli.config import ModelConfig
from decodiff_cli.datasets import BUNDLE_CONFIG, BUNDLE_DENOISER, is_bundle  # noqa: F401  (is_bundle: re-exported)

CONFIG, DENOISER = BUNDLE_CONFIG, BUNDLE_DENOISER
CALIBRATION, CHECKSUMS = "calibration.json", "checksums.json"
AUTOENCODER, TRAINING_LOG = "autoencoder.safetensors", "training_log.jsonl"
REFERENCE = "normal_reference.safetensors"
NORMAL_LATENTS = "normal_latents.safetensors"


class BundleError(ValueError):
    """The bundle is missing, incomplete, altered or of an unknown format."""


@dataclass
class Bundle:
    path: Path
    config: ModelConfig
    calibration: dict[str, Any]

    def files(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in sorted(self.path.iterdir()) if p.is_file()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, allow_nan=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _write_checksums(folder: Path) -> None:
    sums = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    _write_json(folder / CHECKSUMS, sums)


def _save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage; clones make every tensor its own.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(path))


def write_bundle(
    out: Path,
    config: ModelConfig,
    denoiser_state: dict[str, torch.Tensor],
    autoencoder_state: dict[str, torch.Tensor],
    calibration: dict[str, Any],
    training_log: Path | None = None,
    overwrite: bool = False,
    reference: torch.Tensor | None = None,
    normal_latents: dict[str, torch.Tensor] | None = None,
) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json(tmp / CONFIG, config.to_dict())
        _write_json(tmp / CALIBRATION, calibration)
        _save_tensors(tmp / DENOISER, denoiser_state)
        if autoencoder_state:
            _save_tensors(tmp / AUTOENCODER, autoencoder_state)
        if reference is not None:
            _save_tensors(tmp / REFERENCE, {"reference": reference})
        if normal_latents:
            _save_tensors(tmp / NORMAL_LATENTS, {name: bank.half() for name, bank in normal_latents.items()})
        if training_log is not None and Path(training_log).is_file():
            shutil.copyfile(training_log, tmp / TRAINING_LOG)
        _write_checksums(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_bundle(path: Path, verify: bool = True) -> Bundle:
    path = Path(path)
    if not path.is_dir() or not (path / CONFIG).is_file():
        raise BundleError(f"{path} is not a decodiff bundle (no {CONFIG}); make one with `decodiff fit`")
    if verify:
        verify_checksums(path)
    try:
        config = ModelConfig.from_dict(_read_json(path / CONFIG))
    except BundleError:
        raise
    except (ValueError, TypeError) as err:  # unknown keys, newer format, wrongly typed values
        raise BundleError(f"{path / CONFIG}: {err}") from None
    calibration = _read_json(path / CALIBRATION) if (path / CALIBRATION).is_file() else {}
    return Bundle(path=path, config=config, calibration=calibration)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BundleError(f"{path}: not readable JSON ({err})") from None


def verify_checksums(path: Path) -> None:
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        raise BundleError(f"{path}: {CHECKSUMS} is missing, so the bundle cannot be verified")
    sums = _read_json(sums_file)
    if not isinstance(sums, dict):
        raise BundleError(f"{sums_file}: expected an object of file name -> sha256")
    for name in (CONFIG, DENOISER):
        if name not in sums:
            raise BundleError(f"{path}: {CHECKSUMS} does not list {name}")
    for name, expected in sums.items():
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise BundleError(f"{path}: {name} is missing (incomplete copy?)")
        if _sha256(file) != expected:
            raise BundleError(f"{path}: {name} does not match its checksum (altered or corrupted)")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{path}: not a readable safetensors file ({err})") from None


def load_networks(bundle: Bundle):
    """Rebuild the autoencoder and the denoiser from config.json and the weights, and read
    the normal reference when the map uses one: (autoencoder, denoiser, reference or None)."""
    from decodiff_cli.autoencoders import rebuild_autoencoder
    from decodiff_cli.denoiser import Denoiser

    cfg = bundle.config
    autoencoder = rebuild_autoencoder(cfg.autoencoder)
    denoiser = Denoiser(cfg.denoiser)
    parts = [(denoiser, bundle.path / DENOISER)]
    if (bundle.path / AUTOENCODER).is_file() or list(autoencoder.state_dict()):
        parts.append((autoencoder, bundle.path / AUTOENCODER))
    for network, file in parts:
        if not file.is_file():
            raise BundleError(f"{bundle.path}: {file.name} is missing")
        try:
            network.load_state_dict(load_state(file), strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise BundleError(f"{file}: weights do not match the architecture in {CONFIG} ({first})") from None
    return autoencoder.eval().requires_grad_(False), denoiser.eval().requires_grad_(False), load_reference(bundle)


def load_reference(bundle: Bundle) -> torch.Tensor | None:
    cfg = bundle.config
    if cfg.anomaly_map.reference == "none":
        return None
    file = bundle.path / REFERENCE
    if not file.is_file():
        raise BundleError(f"{bundle.path}: {REFERENCE} is missing, but {CONFIG} asks for a {cfg.anomaly_map.reference!r} map reference")
    reference = load_state(file).get("reference")
    h, w = cfg.denoiser.latent_shape
    if reference is None or tuple(reference.shape) != (len(cfg.categories), 2, h, w):
        shape = None if reference is None else tuple(reference.shape)
        raise BundleError(f"{file}: expected a (classes, 2, {h}, {w}) 'reference' tensor, found {shape}")
    return reference.float()


def load_normal_latents(bundle: Bundle) -> dict[str, torch.Tensor] | None:
    """Per class name, the (M, C) normal latent vectors of the map's novelty term, and under
    "<name>/positions" its (C + 1, C, h, w) per-position statistics when the map uses them."""
    cfg = bundle.config
    if not cfg.anomaly_map.novelty:
        return None
    file = bundle.path / NORMAL_LATENTS
    if not file.is_file():
        raise BundleError(f"{bundle.path}: {NORMAL_LATENTS} is missing, but {CONFIG} asks for the map's novelty term")
    banks = load_state(file)
    channels = cfg.denoiser.latent_channels * len(cfg.anomaly_map.novelty_windows)
    wrong = [name for name in cfg.categories
             if name not in banks or banks[name].ndim != 2 or banks[name].shape[1] != channels]
    if wrong:
        raise BundleError(f"{file}: expected a (vectors, {channels}) tensor for each of {', '.join(wrong)}")
    keys = list(cfg.categories)
    if cfg.anomaly_map.novelty_positions:
        keys += [f"{name}/positions" for name in cfg.categories]
        c = cfg.denoiser.latent_channels
        wrong = [key for key in keys[len(cfg.categories):]
                 if key not in banks or banks[key].ndim != 4 or tuple(banks[key].shape[:2]) != (c + 1, c)]
        if wrong:
            raise BundleError(f"{file}: expected a ({c + 1}, {c}, h, w) tensor for each of {', '.join(wrong)} "
                              "(a mean and a whitening matrix per position; refit a model from an earlier development version)")
    return {key: banks[key].float() for key in keys}


def write_calibration(path: Path, calibration: dict[str, Any]) -> None:
    """Replace the thresholds of an existing bundle (``decodiff calibrate``), checksums included."""
    path = Path(path)
    verify_checksums(path)
    tmp = path / f".{CALIBRATION}.tmp"
    _write_json(tmp, calibration)
    os.replace(tmp, path / CALIBRATION)
    sums_tmp = path / f".{CHECKSUMS}.tmp"
    sums = _read_json(path / CHECKSUMS)
    sums[CALIBRATION] = _sha256(path / CALIBRATION)
    _write_json(sums_tmp, sums)
    os.replace(sums_tmp, path / CHECKSUMS)
