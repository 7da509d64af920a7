"""Reuse a trained model: load a training checkpoint, or pretrain a small one when it is missing.

Notebook 04 pretrains tiny CODIS on the emoji corpus and saves `outputs/04/checkpoint_final.pt`
(relative to notebooks/); notebooks 05-06 start from it:

    >>> trained = pretrain_or_load("outputs/04/checkpoint_final.pt")
    >>> trained.model, trained.tokenizer, trained.model_config

When the file is missing (notebook 04 not run yet, or a CI run in a fresh folder), `pretrain_or_load`
runs a short pretraining with the same recipe into the checkpoint's folder first, so those notebooks
always work; they are just better after notebook 04 (or `codis-pretrain`) has trained longer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from codis_lib.config import ModelConfig
from codis_lib.model.loading import load_state_strict
from codis_lib.train.checkpoint import FINAL_CHECKPOINT_NAME, load_checkpoint
from codis_lib.train.config import RunConfig, load_run_config, run_config_from_dict

__all__ = ["TrainedModel", "load_trained_model", "pretrain_or_load"]


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
    from codis_lib.data.tokenizer import load_tokenizer
    from codis_lib.model import build_model

    path = Path(checkpoint)
    stored = load_checkpoint(path)
    saved = stored["config"]
    model_config = ModelConfig.from_dict(saved["model"], source=f"{path} [model]")
    run_config = run_config_from_dict(saved, source=str(path))
    model = build_model(model_config)
    load_state_strict(model, stored["model"], source=str(path))
    model.to(device).eval()
    run_tokenizer = path.parent / "tokenizer"
    if (run_tokenizer / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(run_tokenizer, max_length=run_config.data.max_tokens)
    else:
        from codis_lib.train.engine import tokenizer_location

        tokenizer = load_tokenizer(tokenizer_location(run_config), max_length=run_config.data.max_tokens)
    return TrainedModel(model=model, tokenizer=tokenizer, model_config=model_config, run_config=run_config,
                        checkpoint=path, step=int(stored["step"]))


def pretrain_or_load(checkpoint: str | os.PathLike = "outputs/04/checkpoint_final.pt", *,
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
    from codis_lib.train.engine import train

    if path.name != FINAL_CHECKPOINT_NAME:
        raise FileNotFoundError(f"no checkpoint {path}; pretrain_or_load can only create a run's "
                                f"{FINAL_CHECKPOINT_NAME}")
    if not isinstance(overrides, Mapping):
        from codis_lib.train.config import parse_overrides

        overrides = parse_overrides(list(overrides))
    settings = {**overrides, "train.max_steps": fallback_steps, "train.output_dir": str(path.parent),
                "train.eval.at_end": False, "train.progress": progress, "train.overwrite": True}
    print(f"[codis] {path} not found: pretraining a small model for {fallback_steps} steps "
          f"(run notebook 04 or codis-pretrain for a better one)", flush=True)
    result = train(load_run_config(config, overrides=settings))
    loaded = load_trained_model(result.checkpoint, device=device)
    loaded.trained_now = True
    return loaded
