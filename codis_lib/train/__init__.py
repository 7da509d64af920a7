"""Training: the torchrun/DDP training loop, its setup, the run folder, schedules, sampler and logs.

    >>> from codis_lib.train import load_run_config, train
    >>> result = train(load_run_config("pretrain_emoji", overrides=["train.epochs=1"]))
    >>> trained = pretrain_or_load("outputs/04/checkpoint_final.pt")   # notebooks 05-06

Submodules: engine (`train` and its `train_step`), setup (processes, precision, data, model, optimizer),
run_dir (output folder, checkpoints, final link), schedule, sampler, metrics (metrics.jsonl,
TensorBoard, loss-curve plots), pretrained (`pretrain_or_load`), cli. The run config lives in
`codis_lib.run_config`, checkpoint files in `codis_lib.checkpoint`, loading a trained model in
`codis_lib.evaluation.models`; the names below re-export them for convenience.
They are imported on first use, so that `codis_lib.train.cli` can set up the process (threading
environment) before torch is imported.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "RunConfig": "codis_lib.run_config", "load_run_config": "codis_lib.run_config",
    "train": "codis_lib.train.engine", "train_step": "codis_lib.train.engine", "TrainResult": "codis_lib.train.engine",
    "NonFiniteLossError": "codis_lib.train.engine", "format_retrieval_table": "codis_lib.evaluation.report",
    "TrainedModel": "codis_lib.evaluation.models", "load_trained_model": "codis_lib.evaluation.models",
    "pretrain_or_load": "codis_lib.train.pretrained",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'codis_lib.train' has no attribute {name!r}")
