"""Load a model our trainer saved: the weights, the tokenizer it was trained with and both configs.

    >>> trained = load_trained_model("runs/pretrain_emoji/checkpoint_final.pt")
    >>> trained.model, trained.tokenizer, trained.model_config, trained.run_config

Evaluation, the notebooks and `codis-eval` start from here; `codis_lib.train.pretrained.pretrain_or_load`
adds "train a short run first when the file is missing" on top.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codis_lib.checkpoint import load_checkpoint
from codis_lib.model.loading import load_state_strict
from codis_lib.config import ModelConfig
from codis_lib.run_config import RunConfig, run_config_from_dict, without_retired_keys

__all__ = ["TrainedModel", "load_trained_model"]


@dataclass
class TrainedModel:
    """A model restored from a training checkpoint, with what is needed to feed it."""

    model: Any  # codis_lib.model.CODIS, in eval mode
    tokenizer: Any  # the tokenizer it was trained with
    model_config: ModelConfig  # with vocab_size / special ids of that tokenizer
    run_config: RunConfig  # the whole run's config (data, train)
    checkpoint: Path
    step: int  # optimizer steps the checkpoint was trained for
    trained_now: bool = False  # True when pretrain_or_load had to train it


def load_trained_model(checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu") -> TrainedModel:
    """Return the model (eval mode), tokenizer and configs stored with a training checkpoint.

    The tokenizer is the copy the trainer saved in the run folder (`<run>/tokenizer`), or else the
    one the run's data config names.
    """
    from codis_lib.data.tokenizer import load_tokenizer, tokenizer_location
    from codis_lib.model import build_model

    path = Path(checkpoint)
    stored = load_checkpoint(path)
    saved = without_retired_keys(stored["config"])  # checkpoints of earlier versions hold removed options
    model_config = ModelConfig.from_dict(saved["model"], source=f"{path} [model]")
    run_config = run_config_from_dict(saved, source=str(path))
    model = build_model(model_config)
    load_state_strict(model, stored["model"], source=str(path))
    model.to(device).eval()
    run_tokenizer = path.parent / "tokenizer"
    if (run_tokenizer / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(run_tokenizer, max_length=run_config.data.max_tokens)
    else:
        tokenizer = load_tokenizer(tokenizer_location(run_config), max_length=run_config.data.max_tokens)
    return TrainedModel(model=model, tokenizer=tokenizer, model_config=model_config, run_config=run_config,
                        checkpoint=path, step=int(stored["step"]))
