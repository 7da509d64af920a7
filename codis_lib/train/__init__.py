"""Training: run configs, the torchrun/DDP training loop, checkpoints, schedules and logs.

    >>> from codis_lib.train import load_run_config, train
    >>> result = train(load_run_config("pretrain_emoji", overrides=["train.epochs=1"]))
    >>> trained = pretrain_or_load("outputs/04/checkpoint_final.pt")   # notebooks 05-06

Submodules: config (RunConfig and YAML loading), engine (the loop), checkpoint, schedule, sampler,
logging (metrics.jsonl, TensorBoard, loss-curve plots), pretrained (reuse a checkpoint), cli.
The names below are imported on first use, so that `codis_lib.train.cli` can set up the process
(threading environment) before torch is imported.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "RunConfig": "codis_lib.train.config", "load_run_config": "codis_lib.train.config",
    "train": "codis_lib.train.engine", "TrainResult": "codis_lib.train.engine",
    "NonFiniteLossError": "codis_lib.train.engine", "format_retrieval_table": "codis_lib.train.engine",
    "TrainedModel": "codis_lib.train.pretrained", "load_trained_model": "codis_lib.train.pretrained",
    "pretrain_or_load": "codis_lib.train.pretrained",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'codis_lib.train' has no attribute {name!r}")
