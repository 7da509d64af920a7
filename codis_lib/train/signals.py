"""A polite stop on SIGTERM: the loop saves a checkpoint at the next step boundary and returns, exit status 0.

Cluster schedulers (SLURM, Kubernetes) send SIGTERM some time before they kill a job; the default
action ends the process with status 143 and loses every step since the last checkpoint. Inside
`stop_on_signals()` the signal only sets `StopRequest.signal`; `train` looks at it after each
optimizer step (all ranks agree through one all-reduce, so every process stops on the same step),
writes the checkpoint and ends as `--stop-at-step` does: `--resume` continues bit-identically.
A second SIGTERM while stopping is ignored; SIGKILL cannot be caught, but checkpoints are atomic.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from codis_lib import distributed as cdist

__all__ = ["StopRequest", "stop_on_signals"]


@dataclass
class StopRequest:
    """The name of the signal that asked the run to stop (None while none did)."""

    signal: str | None = None

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """Return whether any rank was asked to stop (one all-reduce with several processes, so all agree)."""
        if world_size == 1 or not cdist.is_distributed():
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        cdist.all_reduce_max_(flag)
        if flag.item() > 0 and self.signal is None:
            self.signal = "SIGTERM"  # another rank's
        return flag.item() > 0


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[StopRequest]:
    """Yield a StopRequest that `signals` set instead of ending the process; the old handlers come back after.

    Outside the main thread (Python allows handlers only there) nothing is installed and the request stays unset.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):  # noqa: ARG001
        if request.signal is None:
            request.signal = signal.Signals(signum).name
            print(f"[codis] {request.signal}: saving a checkpoint after the current step, then stopping", flush=True)

    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
