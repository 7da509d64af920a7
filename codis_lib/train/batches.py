"""What each training batch needs before the forward: the teacher's own views, and one text length on every rank.

    batch = pad_text_to_global_length(next(batches), ctx)                # same caption length on every rank
    teacher = teacher_batch_inputs(batch, run.model_config, ctx.device)  # {} unless the teacher has own views

The model config's teacher views (`teacher_view_inputs`) decide whether the items carry the teacher's
own image and caption (the dataset is built accordingly, `codis_lib.train.data`), which
`teacher_batch_inputs` hands to the model.
"""
from __future__ import annotations

import torch

from codis_lib import distributed as cdist
from codis_lib.config import ModelConfig
from codis_lib.train.process import RunContext

__all__ = ["teacher_view_inputs", "teacher_batch_inputs", "pad_text_to_global_length"]

# The (ids, mask) pairs of a batch: the student's captions, and the teacher's when it reads other ones.
_TEXT_KEYS = (("input_ids", "attention_mask"), ("teacher_input_ids", "teacher_attention_mask"))


def teacher_view_inputs(model_config: ModelConfig) -> tuple[bool, bool]:
    """Return (own image, other caption): the second inputs the training data carries for the momentum teacher.

    Set by `teacher_view: own` or `other_drawing` and `teacher_text_view: other_caption`; never in clip mode (no
    teacher).
    """
    return (model_config.uses_teacher and model_config.teacher_view in ("own", "other_drawing"),
            model_config.uses_teacher and model_config.teacher_text_view == "other_caption")


def teacher_batch_inputs(batch: dict, model_config: ModelConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Return the forward's teacher keywords (image_teacher, teacher_input_ids, ...) on `device`; {} for "same".

    Raises KeyError naming the missing batch keys when the model config asks for a view the batch lacks.
    """
    own_image, other_caption = teacher_view_inputs(model_config)
    keys = (["image_teacher"] if own_image else []) + (list(_TEXT_KEYS[1]) if other_caption else [])
    missing = [key for key in keys if key not in batch]
    if missing:
        raise KeyError(f"the model config's teacher_view / teacher_text_view needs batch key(s) {', '.join(missing)}, "
                       f"which this batch lacks (a loader built for another config?)")
    return {key: batch[key].to(device, non_blocking=True) for key in keys}


def pad_text_to_global_length(batch: dict, ctx: RunContext) -> dict:
    """Return the batch with input_ids / attention_mask right-padded to the longest caption of the global batch.

    The collator pads each rank's batch to its own longest caption; tensors gathered across ranks
    (text states for ITM negatives) must have one length, and the single-process run pads the whole
    global batch to its longest, so matching it keeps the computation identical. The teacher's
    captions (teacher_input_ids / teacher_attention_mask), when the batch has them, are padded to
    their own global longest the same way (one all-reduce for both).
    """
    if ctx.world_size == 1:
        return batch
    pairs = [pair for pair in _TEXT_KEYS if pair[0] in batch]
    lengths = [batch[ids].shape[1] for ids, _ in pairs]
    longest = torch.tensor(lengths, device=batch["input_ids"].device)
    cdist.all_reduce_max_(longest)
    padded = dict(batch)
    for (ids, mask), length, target in zip(pairs, lengths, longest.tolist()):
        if target > length:
            for key in (ids, mask):
                padded[key] = torch.nn.functional.pad(batch[key], (0, target - length), value=0)
    return padded
