"""Load a model our trainer saved: the weights, the tokenizer it was trained with and both configs.

    >>> trained = load_trained_model("runs/pretrain_emoji/checkpoint_final.pt")
    >>> trained.model, trained.tokenizer, trained.model_config, trained.run_config

Evaluation, the notebooks and `codis-eval` start from here; `codis_lib.train.load_or_train.load_or_train`
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

__all__ = ["TrainedModel", "load_trained_model", "check_tokenizer_matches"]

SPECIAL_TOKEN_NAMES = ("pad", "unk", "cls", "sep", "mask")


@dataclass
class TrainedModel:
    """A model restored from a training checkpoint, with what is needed to feed it."""

    model: Any  # codis_lib.model.CODIS, in eval mode
    tokenizer: Any  # the tokenizer it was trained with
    model_config: ModelConfig  # with vocab_size / special ids of that tokenizer
    run_config: RunConfig  # the whole run's config (data, train)
    checkpoint: Path
    step: int  # optimizer steps the checkpoint was trained for
    trained_now: bool = False  # True when load_or_train had to train it
    tokenizer_source: str = ""  # the folder (or hub name) the tokenizer was loaded from


def check_tokenizer_matches(tokenizer: Any, model_config: ModelConfig, tokenizer_source: str, checkpoint: str) -> None:
    """Return None if ``tokenizer`` is the one the checkpoint's model was trained with; raise ValueError otherwise.

    Compared: the vocabulary size against the model's text embedding (``model.text.vocab_size``, the
    rows of its word embedding) and the special token ids recorded in the checkpoint. A smaller
    tokenizer maps captions to the wrong embeddings (recall falls silently), a larger one indexes past
    the embedding; both are refused in one line naming both sizes and the tokenizer folder.
    """
    size, expected = len(tokenizer), model_config.text.vocab_size
    if size != expected:
        raise ValueError(f"tokenizer {tokenizer_source} has {size} tokens but checkpoint {checkpoint} embeds "
                         f"{expected} (model.text.vocab_size): not the tokenizer the model was trained with")
    for name in SPECIAL_TOKEN_NAMES:
        got, want = getattr(tokenizer, f"{name}_token_id", None), getattr(model_config.text, f"{name}_token_id")
        if got != want:
            raise ValueError(f"tokenizer {tokenizer_source} has {name}_token_id {got} but checkpoint {checkpoint} was "
                             f"trained with {want} (model.text.{name}_token_id): not the tokenizer the model was "
                             f"trained with")


def _read_checkpoint(path: Path) -> dict:
    """Return the checkpoint dict at ``path``; a file torch cannot read raises one ValueError line naming it.

    Unpickling a truncated or foreign file can fail with almost any exception (UnpicklingError with
    advice to pass weights_only=False, KeyError, EOFError, RuntimeError from the zip reader); none of
    them names the file. Missing files and the loader's own errors pass through as they are.
    """
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as error:  # noqa: BLE001  (whatever unpickling a damaged file raises)
        first = (str(error).strip().splitlines() or [""])[0]
        if "weights_only" in first:  # torch's advice to unpickle arbitrary code does not fit a damaged file
            first = ""
        raise ValueError(f"{path}: not a readable checkpoint (truncated, or not written by torch.save): "
                         f"{type(error).__name__} {first}".rstrip()) from error


def load_trained_model(checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu",
                       tokenizer: str | os.PathLike | None = None, weights: str = "student") -> TrainedModel:
    """Return the model (eval mode), tokenizer and configs stored with a training checkpoint.

    ``weights="teacher"`` loads the EMA teacher's weights into the student's encoders and projections
    (`CODIS.copy_teacher_to_student`), so that everything that scores the student scores the teacher;
    a clip-mode checkpoint has no teacher (ValueError naming the file).

    The tokenizer is ``tokenizer`` when given (a folder or hub name, e.g. for a checkpoint copied
    without its run folder), else the copy the trainer saved in the run folder (`<run>/tokenizer`),
    else the one the run's data config names. Whichever it is, it must match the checkpoint
    (`check_tokenizer_matches`: vocabulary size and special ids), or a ValueError says why.
    """
    from codis_lib.data.tokenizer import load_tokenizer, tokenizer_location
    from codis_lib.model import build_model

    if weights not in ("student", "teacher"):
        raise ValueError(f"weights={weights!r}: must be 'student' or 'teacher'")
    path = Path(checkpoint)
    stored = _read_checkpoint(path)
    saved = without_retired_keys(stored["config"])  # checkpoints of earlier versions hold removed options
    model_config = ModelConfig.from_dict(saved["model"], source=f"{path} [model]")
    run_config = run_config_from_dict(saved, source=str(path))
    model = build_model(model_config, initialise=False)  # the checkpoint holds every weight
    load_state_strict(model, stored["model"], source=str(path))
    if weights == "teacher":
        try:
            model.copy_teacher_to_student()
        except ValueError as error:  # a clip-mode checkpoint: name the file
            raise ValueError(f"{path}: weights 'teacher': {error}") from None
    model.to(device).eval()
    run_tokenizer = path.parent / "tokenizer"
    if tokenizer is not None:
        source = str(tokenizer)
    elif (run_tokenizer / "tokenizer.json").is_file():
        source = str(run_tokenizer)
    else:
        source = tokenizer_location(run_config)
    text_tokenizer = load_tokenizer(source, max_length=run_config.data.max_tokens)
    check_tokenizer_matches(text_tokenizer, model_config, source, str(path))
    return TrainedModel(model=model, tokenizer=text_tokenizer, model_config=model_config, run_config=run_config,
                        checkpoint=path, step=int(stored["step"]), tokenizer_source=source)
