"""This process's part in a run: rank and device (a process group under torchrun), CPU threads, precision.

    ctx = init_distributed("auto")                      # rank, world size, device
    torch.set_num_threads(resolve_num_threads("auto"))  # the cores idle now, at most 4
    dtype, use_scaler = resolve_precision("auto", ctx.device)

A single process needs no process group; under torchrun (WORLD_SIZE > 1) one is created, NCCL on
GPUs and gloo on CPU. Nothing here touches the data or the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from codis_lib import distributed as cdist
from codis_lib.typed_config import ConfigError

__all__ = ["RunContext", "init_distributed", "idle_cores", "resolve_num_threads", "resolve_precision"]


@dataclass
class RunContext:
    """This process's place in the run: rank, world size, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool  # True when train() created the group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if cdist.is_distributed():
            dist.barrier()


def init_distributed(device_choice: str = "auto") -> RunContext:
    """Return the RunContext, creating the process group when launched by torchrun with WORLD_SIZE > 1.

    NCCL is used on GPUs, gloo on CPU. A group created by the caller beforehand is reused.
    """
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda', but no CUDA device is visible; use train.device=cpu or auto")
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not cdist.is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")  # rendezvous from torchrun's env://
        owns = True
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return RunContext(rank=cdist.get_rank(), world_size=cdist.get_world_size(), local_rank=local_rank,
                      device=device, owns_process_group=owns)


def idle_cores(interval_s: float = 0.5) -> float | None:
    """Return how many CPU cores were idle over the next `interval_s` seconds (Linux /proc/stat), or None.

    Measured now rather than read from the load average, which still counts a job that just ended
    (a package install right before the first run, for instance).
    """
    import time

    def sample() -> tuple[float, float]:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # total, idle + iowait

    try:
        total_0, idle_0 = sample()
        time.sleep(interval_s)
        total_1, idle_1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (idle_1 - idle_0) / max(total_1 - total_0, 1e-9)


def resolve_num_threads(setting: int | str | None, max_auto: int = 4) -> int | None:
    """Return the torch thread count for train.num_threads: a number as given, None as None, "auto" measured.

    "auto": the idle cores now (rounded, at least 1, at most `max_auto`); on a 2-core machine with
    nothing else running that is 2, which made the tiny recipe's steps 1.5x faster than 1 thread, while
    a busy machine gets 1 (a second thread spinning against another job was up to 10x slower).
    Without /proc/stat: the load average's idle cores.
    """
    if setting != "auto":
        return setting
    idle = idle_cores()
    if idle is None:
        try:
            idle = (os.cpu_count() or 1) - os.getloadavg()[0]
        except OSError:
            idle = 1.0
    return max(1, min(int(idle + 0.5), max_auto))


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Return (autocast dtype or None for fp32, whether a GradScaler is needed) for `train.precision`."""
    if precision == "auto":
        if device.type == "cuda":
            return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
        return None, False
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return torch.float16, True
