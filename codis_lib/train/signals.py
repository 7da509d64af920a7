"""SIGTERM answered in every phase of a run: a polite stop at a step boundary while training, a clean exit elsewhere.

Cluster schedulers (SLURM, Kubernetes) send SIGTERM some time before they kill a job; the default
action ends the process with status 143, silently, and loses every step since the last checkpoint.
Inside `stop_on_signals()` what the signal does depends on the run's phase (`StopRequest.phase`):

- "training": it only sets `StopRequest.signal` (one line says so); `train` looks at it after each
  optimizer step (all ranks agree through one all-reduce, so every process stops on the same step),
  writes the checkpoint and ends as `--stop-at-step` does: `--resume` continues bit-identically. A
  second SIGTERM while stopping is ignored;
- "start" (the command line, before the run: imports, config), "setup" (data, model, the start
  position) and "evaluating" (the final evaluation, after checkpoint_final.pt is written): nothing
  waits for a step boundary there, so the handler raises `Terminated` at once, the run's `finally`
  blocks release the folder's lock, and the command prints one line saying what was saved (exit 143).
  A signal that came during training but after its last step skips the evaluation the same way.

SIGKILL cannot be caught, but checkpoints are atomic. Neither torch nor the model is imported here, so
that the command line can install the handler before those slow imports.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["PHASES", "StopRequest", "Terminated", "stop_on_signals"]

PHASES = ("start", "setup", "training", "evaluating")


class Terminated(BaseException):
    """A signal that stopped the run outside training: `phase` is where, `checkpoint` the last one saved (or None).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signal_name: str, phase: str, checkpoint: Path | None = None):
        super().__init__(f"{signal_name} during {phase}")
        self.signal, self.phase, self.checkpoint = signal_name, phase, checkpoint


@dataclass
class StopRequest:
    """The name of the signal that asked the run to stop (None while none did), and the run's phase."""

    signal: str | None = None
    phase: str = "training"
    checkpoint: Path | None = None  # the checkpoint saved before the phase began ("evaluating": the final one)

    def enter(self, phase: str, checkpoint: Path | None = None) -> None:
        """Move to `phase`; outside training a signal that already came raises Terminated now."""
        self.phase, self.checkpoint = phase, checkpoint
        if phase != "training" and self.signal is not None:
            raise Terminated(self.signal, phase, checkpoint)

    def agreed(self, world_size: int, device) -> bool:
        """Return whether any rank was asked to stop (one all-reduce with several processes, so all agree)."""
        import torch

        from codis_lib import distributed as cdist

        if world_size == 1 or not cdist.is_distributed():
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        cdist.all_reduce_max_(flag)
        if flag.item() > 0 and self.signal is None:
            self.signal = "SIGTERM"  # another rank's
        return flag.item() > 0


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM,), phase: str = "training") -> Iterator[StopRequest]:
    """Yield a StopRequest that `signals` set (or raise Terminated, by phase) instead of ending the process.

    The old handlers come back after. Outside the main thread (Python allows handlers only there) nothing
    is installed and the request stays unset.
    """
    request = StopRequest(phase=phase)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):  # noqa: ARG001
        if request.signal is not None:
            return  # a second signal while stopping
        request.signal = signal.Signals(signum).name
        if request.phase != "training":
            raise Terminated(request.signal, request.phase, request.checkpoint)
        print(f"[codis] {request.signal}: saving a checkpoint after the current step, then stopping", flush=True)

    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
