"""Scoring under `accelerate launch`: split the inputs between processes, gather the results.

A command started by `accelerate launch --num_processes N` (or torchrun) runs N times, once
per process. ``ProcessGroup`` makes those N copies one job: the main process decides what
to do (the input list, what --skip-existing leaves out) and hands it to the others, each
process takes its share (accelerate's ``split_between_processes``: contiguous slices in
rank order, so gathering the slices gives back the input order) on its own device, and the
results come back to every process with ``gather_object``. Without a launch it is a group
of one, and every method is the identity: single-process runs take exactly the old path.

Every collective waits at most DECODIFF_DIST_TIMEOUT seconds (default 1800) for the other
processes: one that died or hangs makes the rest fail with a sentence saying so, not wait
forever.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

from decodiff_cli.console import EXIT_ANOMALY, EXIT_INPUTS_FAILED, EXIT_OK

T = TypeVar("T")

TIMEOUT_ENV = "DECODIFF_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # long enough for the slowest shard of a big batch to finish


class MainProcessFailed(ValueError):
    """Raised on the other processes when the main one stopped with a user error: the main
    process has already printed it, so the others leave quietly with the same exit code."""


class PeerLost(RuntimeError):
    """Another process died or stopped answering within the timeout."""


def launched() -> bool:
    """True inside a multi-process launch (accelerate launch, torchrun): they set WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


class ProcessGroup:
    """This process's place in a launched job; a group of one when not launched."""

    def __init__(self, state: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.state = state
        self.timeout_s = timeout_s

    @classmethod
    def from_environment(cls) -> ProcessGroup:
        if not launched():
            return cls()
        from accelerate import PartialState

        from decodiff_cli.fitting import cpu_only_launch

        timeout_s = timeout_seconds()
        state = PartialState(cpu=cpu_only_launch(), timeout=timedelta(seconds=timeout_s))
        expected = int(os.environ["WORLD_SIZE"])
        if state.num_processes != expected:
            # Each process would believe it is alone and process every input: N copies of the work.
            raise ValueError(f"launched as {expected} processes, but accelerate sees {state.num_processes}")
        _sigterm_unwinds()
        end_process_group_at_exit()
        return cls(state, timeout_s)

    @property
    def size(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    @property
    def index(self) -> int:
        return 0 if self.state is None else self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, requested: str) -> str:
        """Each process its own accelerator: 'auto' and a bare 'cuda' become this process's
        device (cuda:LOCAL_RANK); 'cpu' or an explicit 'cuda:N' are the user's choice."""
        if self.state is None or requested not in ("auto", "cuda"):
            return requested
        device = self.state.device
        if device.type == "cpu":
            return "cpu" if requested == "auto" else requested
        return str(device)

    def on_main(self, make: Callable[[], T]) -> T:
        """``make()`` on the main process only, its result handed to every process; a user
        error there (ValueError) stops every process."""
        if self.state is None:
            return make()
        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload = [("ok", make())]
            except ValueError as err:
                payload = [("error", str(err))]
            except BaseException:
                payload = [("error", "the main process failed; see its traceback")]
                self._broadcast(payload)
                raise
        payload = self._broadcast(payload)
        kind, value = payload[0]
        if kind == "error":
            if self.is_main:
                raise ValueError(value)
            raise MainProcessFailed(value)
        return value

    def split(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous share of ``items`` (possibly empty)."""
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as mine:
            return list(mine)

    def gather(self, value: T) -> list[T]:
        """Every process's ``value``, in process order, on every process."""
        if self.state is None:
            return [value]
        from accelerate.utils import gather_object

        return self._collective("gather the results", lambda: gather_object([value]))

    def finish(self) -> None:
        """Wait until every process is here. The last call of a command, after the main
        process has written its output: the launcher stops every process as soon as one
        exits non-zero, which must not cut the main process's stdout or gallery short."""
        if self.state is not None:
            self._collective("finish together", lambda: torch_barrier())

    def _broadcast(self, payload: list[Any]) -> list[Any]:
        from accelerate.utils import broadcast_object_list

        return self._collective("share the input list", lambda: broadcast_object_list(payload, from_process=0))

    def _collective(self, what: str, run: Callable[[], T]) -> T:
        try:
            return run()
        except RuntimeError as err:  # torch.distributed's timeouts and lost connections
            raise PeerLost(
                f"process {self.index}: could not {what}: another process died or did not answer "
                f"within {self.timeout_s:g} s (set {TIMEOUT_ENV} to wait longer); "
                f"rerun (with --skip-existing for score) to finish ({' '.join(str(err).split())[:200]})"
            ) from None


def end_process_group_at_exit() -> None:
    """Destroy the launch's process group when the interpreter exits, while it is still whole.
    Left to finalisation, gloo's worker threads can still hold work and the process aborts
    (SIGABRT, "terminate called without an active exception"), which the launcher reports as
    a failed run although every output was written (pytorch/pytorch PR 179291 describes it)."""
    atexit.register(_end_process_group)  # registering twice is harmless: the second call finds none


# Exit codes of a run that finished its work: every process reaches them together, after its
# outputs are written (None: click's plain return).
FINISHED = (None, EXIT_OK, EXIT_ANOMALY, EXIT_INPUTS_FAILED)


def leave_launch(code: object) -> None:
    """Called as a command exits with ``code``: inside a launch, after a run that finished,
    end the process group and leave at once with that code. Even destroyed, gloo can abort
    the interpreter's finalisation (pytorch/pytorch#190489), which would replace the code by
    SIGABRT; a usage error or an interruption takes the usual path, where the launcher stops
    the other processes anyway."""
    if code not in FINISHED or not launched():
        return
    _end_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _end_process_group() -> None:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def torch_barrier() -> None:
    import torch.distributed

    torch.distributed.barrier()


def _sigterm_unwinds() -> None:
    """The launcher stops the other processes with SIGTERM when one fails; as an exception,
    it lets atomic writers remove their temporary files instead of leaving them behind."""

    def handle(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (an embedding application): leave its handlers
        pass
