"""The notebooks' starting model: a run's final checkpoint, or a short training run that writes one.

Notebook 04 pretrains tiny CODIS on the emoji corpus and saves `outputs/04/checkpoint_final.pt`
(relative to notebooks/); notebooks 05-06 start from it:

    >>> trained = load_or_train("outputs/04/checkpoint_final.pt")   # codis_lib.pretrain_or_load is this function
    >>> trained.model, trained.tokenizer, trained.model_config

When the file is missing (notebook 04 not run yet, or a CI run in a fresh folder), `load_or_train`
runs a short pretraining with the same recipe into the checkpoint's folder first, so those notebooks
always work; they are just better after notebook 04 (or `codis-pretrain`) has trained longer. Loading
alone is `codis_lib.evaluation.models.load_trained_model`; initialising a model from pretrained
weights (DeiT, BERT, train.init_from) is `codis_lib.model.pretrained`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from codis_lib.checkpoint import FINAL_CHECKPOINT_NAME
from codis_lib.evaluation.models import TrainedModel, load_trained_model
from codis_lib.run_config import load_run_config, parse_overrides

__all__ = ["load_or_train"]


def load_or_train(checkpoint: str | os.PathLike = "outputs/04/checkpoint_final.pt", *,
                     config: str | os.PathLike = "pretrain_emoji",
                     overrides: Sequence[str] | Mapping[str, Any] = (), fallback_steps: int = 150,
                     device: str | torch.device = "cpu", progress: bool = False) -> TrainedModel:
    """Return the model saved at `checkpoint`, pretraining it first (a short run) if the file does not exist.

    The fallback run uses `config` with `overrides` (e.g. `["data.root=../data/emoji"]`), stops after
    `fallback_steps` optimizer steps, skips the evaluation and writes into the checkpoint's folder,
    whose `checkpoint_final.pt` is then loaded.
    """
    path = Path(checkpoint)
    if path.is_file():
        return load_trained_model(path, device=device)
    from codis_lib.train.engine import train  # noqa: PLC0415 (the loop's imports only when training)

    if path.name != FINAL_CHECKPOINT_NAME:
        raise FileNotFoundError(f"no checkpoint {path}; load_or_train can only create a run's "
                                f"{FINAL_CHECKPOINT_NAME}")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    settings = {**overrides, "train.max_steps": fallback_steps, "train.output_dir": str(path.parent),
                "train.eval.at_end": False, "train.progress": progress, "train.overwrite": True}
    print(f"[codis] {path} not found: pretraining a small model for {fallback_steps} steps "
          f"(run notebook 04 or codis-pretrain for a better one)", flush=True)
    result = train(load_run_config(config, overrides=settings))
    loaded = load_trained_model(result.checkpoint, device=device)
    loaded.trained_now = True
    return loaded
