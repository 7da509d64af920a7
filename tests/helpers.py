"""Helpers shared by several test modules: a tiny training run's overrides, a free port.

They live here rather than in one test module so that importing them does not also collect (or run the
module-level setup of) another module's tests.
"""
from __future__ import annotations

import os
import socket

from tests.fixtures_data.corpus import small_emoji_corpus


def tiny_run_overrides(output_dir: str | os.PathLike, steps: int, **extra: object) -> list[str]:
    """Return --set values for a seconds-long CODIS run on the small emoji corpus (32 px, batch 8)."""
    root, _ = small_emoji_corpus()
    values = {"data.root": str(root), "model.vision.image_size": 32, "model.queue_size": 32, "train.batch_size": 8,
              "train.max_steps": steps, "train.log_every": 1, "train.eval.at_end": "false",
              "train.tensorboard": "false", "train.progress": "false", "train.output_dir": str(output_dir),
              # One thread: tiny matrices gain nothing from two, and OpenMP threads spinning on a busy
              # 2-core machine (pytest + notebook kernels) can make a step 10x slower.
              "train.num_threads": 1, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, for a gloo rendezvous in a test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
