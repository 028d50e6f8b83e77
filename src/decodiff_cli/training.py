"""Training the denoiser with HF accelerate (one CPU, one GPU, DDP via `accelerate launch`).

The loop is the paper's (METHOD.md 3-4): cached clean latents -> masked corruption ->
eps_theta(z_t, t) regressed on the direction of deviation eps' with MSE, AdamW with a
warm-up + cosine schedule, plus an EMA of the weights.

Reproducibility by construction: every random draw of step k (which images, which
views, the corruption, dropout) comes from generators seeded by (seed, k, rank), so a
run resumed from the checkpoint of step k continues exactly as an uninterrupted one.
`--batch-size` is the *global* batch: each process takes its share of the same rows, so
any number of processes makes the same number of optimiser steps per epoch.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn import functional as F

from decodiff_cli.config import ModelConfig
from decodiff_cli.denoiser import Denoiser
from decodiff_cli.deviation import alpha_bars, corrupt, sample_patch_size
from decodiff_cli.latent_cache import LatentCache
from decodiff_cli.latents import LatentScaler

DEFAULT_MAX_STEPS = 2000  # when neither epochs, steps nor a time budget is given
CHECKPOINT_EVERY_S = 600.0

Progress = Callable[[dict[str, Any]], None]


class TrainingInterrupted(Exception):
    """Stopped by a signal; a resumable checkpoint was saved."""

    def __init__(self, checkpoint: Path, step: int) -> None:
        super().__init__(f"training interrupted at step {step}; resume with --resume (checkpoint: {checkpoint})")
        self.checkpoint = checkpoint
        self.step = step


@dataclass
class TrainingResult:
    denoiser_state: dict[str, torch.Tensor]
    steps: int
    epochs: float
    seconds: float
    final_loss: float


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop stops at the next step boundary, all ranks together."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _EMA:
    """Exponential moving average of the weights, checkpointed with accelerate."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm-up: early on the average would be dominated by the random initialisation.
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value.float(), 1 - decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


def lr_factor(progress: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% over `progress` in [0, 1]."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(
    cfg: ModelConfig,
    cache: LatentCache,
    labels: torch.Tensor,
    accelerator,
    checkpoint_dir: Path,
    resume: bool = False,
    progress: Progress | None = None,
    log_file: Path | None = None,
    should_stop: Callable[[int], bool] | None = None,
    budget_s: float | None = None,
) -> TrainingResult:
    """Train eps_theta on ``cache`` (raw latents) with class ``labels`` (N,).

    ``should_stop(step)``, checked at every step boundary, stops the run as SIGINT does:
    a checkpoint is saved and TrainingInterrupted raised (for callers that stop training
    programmatically, e.g. a GUI or a test interrupting at a known step). ``budget_s``
    overrides the time budget of the config (fit() deducts the time spent encoding).
    """
    tc = cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes
    if tc.batch_size % world:
        raise ValueError(f"--batch-size {tc.batch_size} must be divisible by the {world} processes")
    num_images = cache.num_images
    batch = min(tc.batch_size, num_images - num_images % world) if num_images >= world else num_images
    steps_per_epoch = max(1, num_images // batch)
    max_steps = tc.max_steps or (tc.epochs * steps_per_epoch if tc.epochs else 0)
    if not max_steps and not tc.time_budget_minutes:
        max_steps = DEFAULT_MAX_STEPS
    budget_s = tc.time_budget_minutes * 60 if budget_s is None else budget_s

    torch.manual_seed(tc.seed)
    model = Denoiser(cfg.denoiser)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    state = {"step": 0, "elapsed": 0.0, "progress": 0.0}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: lr_factor(state["progress"], state["step"], tc.warmup_steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = _EMA(accelerator.unwrap_model(model), tc.ema_decay) if tc.ema_decay > 0 else None
    accelerator.register_for_checkpointing(scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    trainer_file = checkpoint_dir / "trainer_state.json"
    if resume:
        if not trainer_file.is_file():
            raise ValueError(f"nothing to resume: no checkpoint in {checkpoint_dir}")
        accelerator.load_state(str(checkpoint_dir))
        state.update(json.loads(trainer_file.read_text()))
        if log_file is not None and accelerator.is_main_process:
            _truncate_log(log_file, state["step"])

    scaler = LatentScaler(cfg.latent_scaling)
    abar = alpha_bars(cfg.schedule.num_timesteps, cfg.schedule.kind)
    device = accelerator.device
    started, last_save, loss_value = time.monotonic() - state["elapsed"], time.monotonic(), float("nan")
    this_run = (time.monotonic(), state["step"])  # for images/s: only steps made in this process

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(checkpoint_dir))
        if accelerator.is_main_process:
            trainer_file.write_text(json.dumps(state))
        accelerator.wait_for_everyone()

    def update_progress() -> None:
        state["elapsed"] = time.monotonic() - started
        by_steps = state["step"] / max_steps if max_steps else 0.0
        by_time = state["elapsed"] / budget_s if budget_s else 0.0
        state["progress"] = max(by_steps, by_time)

    model.train()
    update_progress()
    with _StopFlag() as stop:
        while True:  # progress is updated after each step: the last log record is the stopping state
            asked = stop.raised or (should_stop is not None and should_stop(state["step"]))
            flags = torch.tensor([float(state["progress"] >= 1.0), float(asked)], device=device)
            flags = accelerator.reduce(flags, reduction="sum") if world > 1 else flags
            if flags[0] > 0:
                break
            if flags[1] > 0:
                save_checkpoint()
                raise TrainingInterrupted(checkpoint_dir, state["step"])

            step = state["step"]
            rows = batch_rows(step, num_images, batch, steps_per_epoch, tc.seed, rank, world)
            gen = torch.Generator().manual_seed(((tc.seed * 1_000_003 + step) * 131 + rank) % (2**63))
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # dropout
            views = torch.randint(0, cache.latents.shape[1], (len(rows),), generator=gen)
            z0 = scaler.normalize(cache.batch(rows, views)).to(device)
            t = torch.randint(0, cfg.schedule.num_timesteps, (len(rows),), generator=gen).to(device)
            patch = sample_patch_size(tc.patch_sizes, tc.patch_probs, gen)
            noisy = corrupt(z0, t, abar, patch, tc.mask_ratio_max, tc.shuffle_ratio_max, gen)
            class_ids = labels[rows].to(device) if cfg.denoiser.num_classes else None

            micro = max(1, tc.gradient_accumulation_steps)
            for chunk in torch.arange(len(rows)).chunk(micro):
                with accelerator.accumulate(model):
                    eps = model(noisy.z_t[chunk], t[chunk], class_ids[chunk] if class_ids is not None else None)
                    loss = F.mse_loss(eps.float(), noisy.target[chunk])
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1  # before scheduler.step(): the next lr is that of step + 1
            update_progress()  # the log record describes the state after this step
            scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), state["step"])
            loss_value = float(loss.detach())
            _report(progress, log_file, accelerator, state, steps_per_epoch, max_steps, budget_s, batch,
                    loss_value, optimizer, this_run, world)
            if time.monotonic() - last_save > CHECKPOINT_EVERY_S:
                save_checkpoint()
                last_save = time.monotonic()

    # The log keeps every 10th step; the last one is always written, so the bundle's log
    # says how many optimiser steps were made (and with what final loss).
    if state["step"] % 10 and state["step"] > 1 and state["step"] > this_run[1]:
        _report(None, log_file, accelerator, state, steps_per_epoch, max_steps, budget_s, batch,
                loss_value, optimizer, this_run, world, force=True)
    save_checkpoint()  # the finished state: a crash while writing the bundle loses nothing
    weights = ema.state_dict() if ema is not None else accelerator.unwrap_model(model).state_dict()
    return TrainingResult(
        denoiser_state={k: v.detach().cpu().float() for k, v in weights.items()},
        steps=state["step"],
        epochs=state["step"] / steps_per_epoch,
        seconds=state["elapsed"],
        final_loss=loss_value,
    )


def batch_rows(step: int, num_images: int, batch: int, steps_per_epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """The image rows process ``rank`` of ``world`` trains on at ``step``.

    One permutation per epoch, the same on every process; each step takes the next
    ``batch`` (global) rows of it and each process its own contiguous ``batch // world``
    of those: the processes see disjoint rows whose union is the one-process batch.
    """
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    share = batch // world
    return order[offset * batch : (offset + 1) * batch][rank * share : (rank + 1) * share]


def _truncate_log(log_file: Path, step: int) -> None:
    """Keep only the log records up to the checkpoint's step. A run killed outright
    (SIGKILL, power loss) may have logged steps after its last checkpoint, which the
    resumed run makes again, and may have left a half-written last line."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    log_file.write_text("".join(kept))


def _report(progress, log_file, accelerator, state, steps_per_epoch, max_steps, budget_s, batch,
            loss_value, optimizer, this_run, world, force=False) -> None:
    if not accelerator.is_main_process:
        return
    run_start, run_first_step = this_run
    rate = (state["step"] - run_first_step) * batch / max(time.monotonic() - run_start, 1e-9)
    record = {
        "step": state["step"],
        "epoch": round(state["step"] / steps_per_epoch, 3),
        "loss": loss_value,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": round(rate, 2),
        "elapsed_s": round(state["elapsed"], 2),
        "progress": round(state["progress"], 4),
        "max_steps": max_steps,
        "budget_s": budget_s,
        "processes": world,
    }
    if log_file is not None and (force or state["step"] % 10 == 0 or state["step"] == 1):
        with open(log_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if progress is not None:
        progress(record)
