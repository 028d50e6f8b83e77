"""Training the denoiser with HF accelerate (one CPU, one GPU, DDP via `accelerate launch`).

The loop is the paper's (docs/method.md 3-4): cached clean latents -> masked corruption ->
eps_theta(z_t, t) regressed on the direction of deviation eps' with MSE, AdamW with a
warm-up + cosine schedule, plus an EMA of the weights.

Reproducibility by construction: every random draw of step k comes from generators
seeded by (seed, k, ...), so a run resumed from the checkpoint of step k continues exactly
as an uninterrupted one. Each sample's own draws (its view, t, posterior sample, mask and
noise) come from a generator seeded by (seed, k, its place in the global batch), so they do
not depend on the number of processes; the patch size by (seed, k); dropout and the sources
of shuffled patches (which mix the samples a process holds) by (seed, k, rank).
`--batch-size` is the *global* batch: each process takes its share of the same rows, so
any number of processes makes the same number of optimiser steps per epoch, and the loss is
weighted so that the gradient is the mean over the global batch however the rows are split.

Under a time budget the schedule is fixed in steps after the first few (timed) steps: the
run plans how many steps fit and its learning rate follows steps, not the clock; if the
plan ends early it goes on at the final rate until the clock ends it, so
``--max-steps <planned> [--stop-step <done>]`` with the same seed replays it.
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
from decodiff_cli.deviation import alpha_bars, as_deviation, corrupt, loss_weights, sample_patch_size
from decodiff_cli.latent_cache import LatentCache
from decodiff_cli.latents import LatentScaler

DEFAULT_MAX_STEPS = 2000  # when neither epochs, steps nor a time budget is given
CHECKPOINT_EVERY_S = 600.0
PLAN_AFTER = 10  # steps timed, at least, before a time-budget run fixes its length (or the warm-up, if shorter)
PLAN_SHARE = 0.03  # of the training budget timed, at least, before that (if the warm-up lasts so long)

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
    schedule_steps: int = 0  # the length the lr schedule followed (planned under a time budget); 0: none


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
        self.shadow = {k: v.detach().clone().to(_average_dtype(v)) for k, v in model.state_dict().items()}

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
        # accelerate loads checkpoints onto the CPU: the average lives where the model does
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {', '.join(missing[:3])}: it is of another model")
        self.shadow = {k: state[k].to(device=ref.device, dtype=ref.dtype).clone() for k, ref in self.shadow.items()}


def _average_dtype(value: torch.Tensor) -> torch.dtype:
    """float32 for half-precision weights (their average would round away small updates)."""
    return torch.float32 if value.is_floating_point() and value.dtype != torch.float64 else value.dtype


def lr_factor(progress: float, count: int, warmup: int, horizon: float = 1.0, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` counts (steps or epochs), then a cosine from 1 that
    reaches ``floor`` at ``progress`` = ``horizon`` (progress: the fraction of training done)."""
    if count < warmup:
        return (count + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress / horizon, 1.0)))


@dataclass
class LrSchedule:
    """The learning-rate factor of each step, for a run of ``length`` steps."""

    steps_per_epoch: int
    per_epoch: bool  # the factor changes once per epoch (the authors'), else every step
    warmup: int  # in epochs when per_epoch, else in steps
    horizon: float = 1.0
    floor: float = 0.1

    @classmethod
    def from_config(cls, tc, steps_per_epoch: int) -> "LrSchedule":
        warmup = tc.warmup_epochs if tc.lr_per_epoch else tc.warmup_steps
        return cls(steps_per_epoch, tc.lr_per_epoch, warmup, tc.cosine_horizon, tc.lr_floor)

    def factor(self, step: int, length: int) -> float:
        if self.per_epoch:
            epoch = step // self.steps_per_epoch
            start = epoch * self.steps_per_epoch  # the factor of an epoch is that of its first step
            return lr_factor(start / length if length else 0.0, epoch, self.warmup, self.horizon, self.floor)
        return lr_factor(step / length if length else 0.0, step, self.warmup, self.horizon, self.floor)

    @property
    def warmup_steps(self) -> int:
        return self.warmup * self.steps_per_epoch if self.per_epoch else self.warmup


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
    overrides the time budget of the config (fit() deducts the time spent encoding and the
    estimated cost of what follows training).
    """
    tc = cfg.train
    world = accelerator.num_processes
    if tc.batch_size % world:
        raise ValueError(f"--batch-size {tc.batch_size} must be divisible by the {world} processes")
    micro = max(1, tc.gradient_accumulation_steps)
    if accelerator.gradient_accumulation_steps != micro:
        raise ValueError(f"gradient accumulation: the settings ask for {micro} micro-batches, "
                         f"the accelerator was made for {accelerator.gradient_accumulation_steps}")
    num_images = cache.num_images
    batch = min(tc.batch_size, num_images)
    steps_per_epoch = math.ceil(num_images / batch)  # a full pass: the last, smaller batch included
    max_steps = tc.max_steps or (tc.epochs * steps_per_epoch if tc.epochs else 0)
    budget_s = tc.time_budget_minutes * 60 if budget_s is None else budget_s
    if not max_steps and not budget_s:
        max_steps = DEFAULT_MAX_STEPS
    schedule = LrSchedule.from_config(tc, steps_per_epoch)
    # A time-budget run fixes its length within its warm-up, whose rate does not depend on
    # the length (without a warm-up: after step 0, whose progress is 0 whatever the length).
    plan_by = max(1, schedule.warmup_steps)

    torch.manual_seed(tc.seed)
    model = Denoiser(cfg.denoiser)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    state = {"step": 0, "elapsed": 0.0, "progress": 0.0, "planned": 0}

    def length() -> int:
        return state["planned"] or max_steps

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: schedule.factor(state["step"], length()))
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
    step_times: list[tuple[float, int]] = []  # (end, step) of this process's steps, until the plan
    reserve_s = 0.0  # the final checkpoint's measured cost, kept out of a time budget
    report = _Reporter(progress, log_file, accelerator.is_main_process, optimizer, steps_per_epoch, batch, world,
                       run_start=this_run[0], run_first_step=this_run[1])

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(checkpoint_dir))
        if accelerator.is_main_process:
            trainer_file.write_text(json.dumps(state))
        accelerator.wait_for_everyone()

    def update_progress() -> None:
        state["elapsed"] = time.monotonic() - started
        # A budgeted run whose plan proves short goes on at the schedule's final rate until
        # the clock ends it (only an explicit step count caps it); --stop-step beyond
        # --max-steps replays such a run.
        end = max_steps if budget_s and state["planned"] else max(length(), tc.stop_step)
        by_steps = state["step"] / end if end else 0.0
        by_time = state["elapsed"] / max(budget_s - reserve_s, 1e-6) if budget_s else 0.0
        state["progress"] = max(by_steps, by_time)

    def plan() -> None:
        """Under a time budget: how many steps fit, from the time per step measured so far."""
        nonlocal reserve_s
        if not budget_s or state["planned"]:
            return
        step_times.append((time.monotonic(), state["step"]))
        ready = state["step"] >= plan_by or (state["step"] >= PLAN_AFTER and
                                              step_times[-1][0] - this_run[0] >= PLAN_SHARE * budget_s)
        if world > 1:  # the clocks differ: all processes plan at the same step, when one is ready
            ready = accelerator.reduce(torch.tensor([float(ready)], device=device), reduction="sum")[0] > 0
        if not ready:
            return
        (t0, s0), (t1, s1) = (step_times[0], step_times[-1]) if len(step_times) > 1 else (this_run, step_times[-1])
        per_step = (t1 - t0) / max(1, s1 - s0)  # from the end of the first step: it pays one-time costs
        clock = time.monotonic()
        save_checkpoint()  # timed: the final one costs as much
        reserve_s = time.monotonic() - clock
        update_progress()
        planned = state["step"] + max(0, int((budget_s - reserve_s - state["elapsed"]) / max(per_step, 1e-9)))
        if max_steps:
            planned = min(planned, max_steps)
        if world > 1:  # one schedule for all processes: the main one's
            from accelerate.utils import broadcast

            planned = int(broadcast(torch.tensor([planned], device=device), from_process=0)[0])
        state["planned"] = max(planned, state["step"])

    model.train()
    update_progress()
    with _StopFlag() as stop:
        while True:  # progress is updated after each step: the last log record is the stopping state
            asked = stop.raised or (should_stop is not None and should_stop(state["step"]))
            done = state["progress"] >= 1.0 or (tc.stop_step > 0 and state["step"] >= tc.stop_step)
            flags = torch.tensor([float(done), float(asked)], device=device)
            flags = accelerator.reduce(flags, reduction="sum") if world > 1 else flags
            if flags[0] > 0:
                break
            if flags[1] > 0:
                save_checkpoint()
                raise TrainingInterrupted(checkpoint_dir, state["step"])

            step = state["step"]
            loss_value = _train_step(model, optimizer, accelerator, cfg, cache, labels, scaler, abar, step,
                                     batch, steps_per_epoch, micro)
            state["step"] = step + 1  # before scheduler.step(): the next lr is that of step + 1
            update_progress()  # the log record describes the state after this step
            plan()
            scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), state["step"])
            report(state, max_steps=length(), budget_s=budget_s, loss=loss_value)
            if time.monotonic() - last_save > CHECKPOINT_EVERY_S:
                save_checkpoint()
                last_save = time.monotonic()

    # The log keeps every 10th step; the last one is always written, so the bundle's log
    # says how many optimiser steps were made (and with what final loss).
    if state["step"] % 10 and state["step"] > 1 and state["step"] > this_run[1]:
        report(state, max_steps=length(), budget_s=budget_s, loss=loss_value, force=True, notify=False)
    save_checkpoint()  # the finished state: a crash while writing the bundle loses nothing
    weights = ema.state_dict() if ema is not None else accelerator.unwrap_model(model).state_dict()
    return TrainingResult(
        denoiser_state={k: v.detach().cpu().float() for k, v in weights.items()},
        steps=state["step"],
        epochs=state["step"] / steps_per_epoch,
        seconds=state["elapsed"],
        final_loss=loss_value,
        schedule_steps=length(),
    )


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**61 - 1)
    return value


def _train_step(model, optimizer, accelerator, cfg: ModelConfig, cache: LatentCache, labels: torch.Tensor,
                scaler: LatentScaler, abar: torch.Tensor, step: int, batch: int, steps_per_epoch: int,
                micro: int) -> float:
    """One optimiser step on this process's share of the global batch of ``step``; returns
    the mean loss of its rows (nan when it has none)."""
    tc = cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    everyone = epoch_rows(step, cache.num_images, batch, steps_per_epoch, tc.seed)
    start, stop = share_bounds(len(everyone), rank, world)
    rows = everyone[start:stop]
    samples = [torch.Generator().manual_seed(_seed(tc.seed, step, position)) for position in range(start, stop)]
    here = torch.Generator().manual_seed(_seed(tc.seed, step, world, rank))  # dropout, shuffle sources
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=here)))  # dropout
    views = torch.tensor([int(torch.randint(0, cache.latents.shape[1], (1,), generator=g)) for g in samples], dtype=torch.long)
    t = torch.tensor([int(torch.randint(0, cfg.schedule.num_timesteps, (1,), generator=g)) for g in samples], dtype=torch.long)
    z0 = scaler.normalize(cache.samples(cache.batch(rows, views), samples))
    class_ids = labels[rows] if cfg.denoiser.num_classes else None
    # every row weighs 1 / (global batch): with DDP's mean over processes, the gradient is the
    # global batch's mean however unevenly the rows are split
    weights = torch.full((len(rows),), world / len(everyone))
    if not len(rows):  # more processes than rows: a zero-weight stand-in keeps the gradient sync going
        z0, t, weights = torch.zeros(1, *z0.shape[1:]), torch.zeros(1, dtype=torch.long), torch.zeros(1)
        samples = [torch.Generator().manual_seed(_seed(tc.seed, step, -1))]
        class_ids = torch.zeros(1, dtype=torch.long) if cfg.denoiser.num_classes else None
    patch = sample_patch_size(tc.patch_sizes, tc.patch_probs, torch.Generator().manual_seed(_seed(tc.seed, step)))
    noisy = corrupt(z0.to(device), t.to(device), abar, patch, tc.mask_ratio_max, tc.shuffle_ratio_max, samples,
                    exact_mask=tc.exact_mask, source_generator=here)
    t, weights = t.to(device), weights.to(device)
    class_ids = class_ids.to(device) if class_ids is not None else None

    losses = []
    # exactly `micro` micro-batches, as accelerate counts them; an empty one is a zero-weight row
    for chunk in torch.arange(len(t)).tensor_split(micro):
        chunk_weights = weights[chunk]
        if not len(chunk):
            chunk, chunk_weights = torch.zeros(1, dtype=torch.long), torch.zeros(1, device=device)
        with accelerator.accumulate(model):
            out = model(noisy.z_t[chunk], t[chunk], class_ids[chunk] if class_ids is not None else None)
            eps = as_deviation(out.float(), noisy.z_t[chunk].float(), t[chunk], abar, cfg.denoiser.prediction)
            err = F.mse_loss(eps, noisy.target[chunk].float(), reduction="none")
            err = err * loss_weights(t[chunk], abar, cfg.denoiser.prediction)
            per_row = (err * element_weights(noisy.kept[chunk], tc.noised_weight)).flatten(1).mean(dim=1)
            # accelerate divides by the number of micro-batches; the weights already sum to the share
            accelerator.backward((per_row * chunk_weights).sum() * accelerator.gradient_accumulation_steps)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(per_row.detach()[chunk_weights > 0])
    mine = torch.cat(losses)
    return float(mine.mean()) if len(mine) else float("nan")


def element_weights(kept: torch.Tensor, noised_weight: float) -> torch.Tensor:
    """Loss weight per element: 1 where the latent was kept clean, ``noised_weight`` where
    it was noised (TrainConfig.noised_weight)."""
    return 1 + (noised_weight - 1) * (1 - kept.float())


def epoch_rows(step: int, num_images: int, batch: int, steps_per_epoch: int, seed: int) -> torch.Tensor:
    """The image rows of the global batch of ``step``: one permutation per epoch, the same
    on every process, taken ``batch`` rows at a time (the epoch's last batch: the rest)."""
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[offset * batch : (offset + 1) * batch]


def share_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of process ``rank``'s contiguous share of ``count`` rows: shares differ by
    at most one row, the first ones larger; with fewer rows than processes the last are empty."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def batch_rows(step: int, num_images: int, batch: int, steps_per_epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """The image rows process ``rank`` of ``world`` trains on at ``step``: its share of the
    global batch (the processes see disjoint rows whose union is the one-process batch)."""
    everyone = epoch_rows(step, num_images, batch, steps_per_epoch, seed)
    start, stop = share_bounds(len(everyone), rank, world)
    return everyone[start:stop]


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


@dataclass
class _Reporter:
    """One record per step: written to the training log (every 10th step, the first, and
    when forced) and passed to ``progress``, on the main process only."""

    progress: Progress | None
    log_file: Path | None
    is_main: bool
    optimizer: Any
    steps_per_epoch: int
    batch: int  # images per step, for images/s
    world: int
    run_start: float  # when this process's run started, and at which step: images/s counts
    run_first_step: int  # only the steps made in this process

    def __call__(self, state: dict[str, Any], *, max_steps: int, budget_s: float, loss: float,
                 force: bool = False, notify: bool = True) -> None:
        if not self.is_main:
            return
        rate = (state["step"] - self.run_first_step) * self.batch / max(time.monotonic() - self.run_start, 1e-9)
        record = {
            "step": state["step"],
            "epoch": round(state["step"] / self.steps_per_epoch, 3),
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": round(rate, 2),
            "elapsed_s": round(state["elapsed"], 2),
            "progress": round(state["progress"], 4),
            "max_steps": max_steps,
            "budget_s": budget_s,
            "processes": self.world,
        }
        if self.log_file is not None and (force or state["step"] % 10 == 0 or state["step"] == 1):
            with open(self.log_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if notify and self.progress is not None:
            self.progress(record)
