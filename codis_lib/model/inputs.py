"""Checks of the tensors `CODIS.forward` receives: each error is one line naming the argument.

`check_inputs` covers the student's batch (image, captions, alpha, ids, seeds); `check_teacher_inputs`
the optional views the momentum teacher encodes instead of the student's (`image_teacher`,
`teacher_input_ids`, `teacher_attention_mask`; see `ModelConfig.teacher_view`). Both return None and
raise ValueError when a batch cannot be what the model was built for.
"""
from __future__ import annotations

import torch

from codis_lib.config import ModelConfig

__all__ = ["check_inputs", "check_teacher_inputs"]


def _check_image(config: ModelConfig, image: torch.Tensor, name: str, batch: int | None) -> None:
    """Raise ValueError unless `image` is (B, 3, S, S) for vision.image_size S (and B = batch when given)."""
    size = config.vision.image_size
    if image.dim() != 4 or image.shape[1:] != (3, size, size):
        raise ValueError(f"{name} must have shape (B, 3, {size}, {size}) for vision.image_size {size}, "
                         f"got {tuple(image.shape)}")
    if batch is not None and image.shape[0] != batch:
        raise ValueError(f"{name} has {image.shape[0]} images but the batch has {batch}")


def _check_text(config: ModelConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: int,
                names: tuple[str, str]) -> None:
    """Raise ValueError unless (input_ids, attention_mask) are (B, L) int64 ids inside the vocabulary."""
    ids_name, mask_name = names
    if input_ids.dim() != 2 or input_ids.shape[0] != batch:
        raise ValueError(f"{ids_name} must have shape (B, L) with B = {batch}, got {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"{mask_name} shape {tuple(attention_mask.shape)} != {ids_name} shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.dtype != torch.long:
        raise ValueError(f"{ids_name} must be int64, got {input_ids.dtype}")
    text = config.text
    if input_ids.shape[1] > text.max_position_embeddings:
        raise ValueError(f"{ids_name} has {input_ids.shape[1]} tokens, more than text.max_position_embeddings "
                         f"{text.max_position_embeddings}")
    if int(input_ids.max()) >= text.vocab_size or int(input_ids.min()) < 0:
        raise ValueError(f"{ids_name} has ids outside [0, text.vocab_size={text.vocab_size}); build the config "
                         f"with ModelConfig.with_tokenizer(tokenizer)")


def check_inputs(config: ModelConfig, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 alpha: float, image_ids: torch.Tensor | None, sample_seeds: torch.Tensor | None) -> None:
    """Raise ValueError naming the argument when the student's batch cannot be what `config` was built for."""
    _check_image(config, image, "image", None)
    batch = image.shape[0]
    _check_text(config, input_ids, attention_mask, batch, ("input_ids", "attention_mask"))
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if image_ids is not None and (image_ids.shape != (batch,) or image_ids.dtype != torch.long):
        raise ValueError(f"image_ids must be an int64 tensor of shape ({batch},), got "
                         f"{tuple(image_ids.shape)} {image_ids.dtype}")
    if image_ids is not None and int(image_ids.min()) < 0:
        raise ValueError("image_ids must be >= 0 (-100 marks queue entries without an id)")
    if sample_seeds is not None and sample_seeds.shape != (batch,):
        raise ValueError(f"sample_seeds must have shape ({batch},), got {tuple(sample_seeds.shape)}")


def check_teacher_inputs(config: ModelConfig, batch: int, image_teacher: torch.Tensor | None,
                         teacher_input_ids: torch.Tensor | None,
                         teacher_attention_mask: torch.Tensor | None) -> None:
    """Raise ValueError naming the argument when the teacher's own views do not fit a batch of `batch` samples.

    The teacher's captions may have another length L' than the student's; ids and mask come together.
    In clip mode (no teacher) the views are ignored, so they are not checked either.
    """
    if not config.uses_teacher:
        return
    if image_teacher is not None:
        _check_image(config, image_teacher, "image_teacher", batch)
    if (teacher_input_ids is None) != (teacher_attention_mask is None):
        raise ValueError("teacher_input_ids and teacher_attention_mask must be given together")
    if teacher_input_ids is not None:
        _check_text(config, teacher_input_ids, teacher_attention_mask, batch,
                    ("teacher_input_ids", "teacher_attention_mask"))
