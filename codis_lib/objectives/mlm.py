"""L_mlm: ALBEF's masked language modelling with distillation from the momentum teacher.

L_mlm = (1 - alpha) CE + alpha D over the masked tokens: CE is the cross-entropy against the original
token ids, D the cross-entropy from the teacher's MLM distribution at the same positions. Both are
averaged over the masked tokens of the global batch (`global_token_count`). `masked_language_modelling`
takes the student's fusion states and two callables (the MLM head, the teacher's logits) and returns the
loss; `mlm_loss_from_logits` is the arithmetic on logits alone. Which tokens are masked, and how, is
`codis_lib.model.masking.mask_tokens`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from codis_lib.distributed import all_reduce_sum_, get_world_size, is_distributed

__all__ = ["MLMLosses", "global_token_count", "mlm_loss_from_logits", "masked_language_modelling"]

# A tensor -> MLM logits (M, V): the head on masked states (M, D), or the teacher's logits at a (B, L) mask.
LogitsFunction = Callable[[torch.Tensor], torch.Tensor]


class MLMLosses(NamedTuple):
    """L_mlm = (1 - alpha) CE + alpha D, with CE, D and the masked-token accuracy (all but loss detached)."""

    loss: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor
    accuracy: torch.Tensor


def global_token_count(positions: torch.Tensor) -> torch.Tensor:
    """Return the masked-token count to divide this rank's token sums by: global count / world size.

    DDP averages gradients over processes, so dividing by this gives the mean over the masked tokens of
    the global batch, independent of how the batch is split. In one process it is the plain count.
    """
    count = positions.sum().float()
    if is_distributed():
        count = all_reduce_sum_(count.clone()) / get_world_size()
    return count


def mlm_loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, *, alpha: float,
                         teacher_logits: torch.Tensor | None = None) -> MLMLosses:
    """Return ALBEF's MLM loss (1 - alpha) CE + alpha D over M masked tokens, with its parts.

    logits (M, V): the student's MLM logits at the masked positions; targets (M,): the original ids;
    count: from `global_token_count`. CE = sum of token cross-entropies / count. D = sum over tokens of
    -sum_v softmax(teacher_logits) log softmax(logits), / count; without teacher logits or at alpha = 0
    the loss is CE and D is reported as 0.
    """
    ce = F.cross_entropy(logits, targets, reduction="sum") / count
    accuracy = (logits.detach().argmax(dim=1) == targets).float().mean()
    if alpha == 0 or teacher_logits is None:
        return MLMLosses(ce, ce.detach(), torch.zeros_like(ce).detach(), accuracy)
    with torch.no_grad():
        soft_labels = F.softmax(teacher_logits.float(), dim=-1)  # (M, V)
    distill = -(soft_labels * F.log_softmax(logits, dim=-1)).sum() / count
    return MLMLosses((1 - alpha) * ce + alpha * distill, ce.detach(), distill.detach(), accuracy)


def masked_language_modelling(hidden: torch.Tensor, labels: torch.Tensor, predict: LogitsFunction, *, alpha: float,
                              teacher_logits: LogitsFunction | None = None) -> MLMLosses:
    """Return (L_mlm, CE, D, accuracy) of one batch from the student's fusion states of the masked captions.

    hidden (B, L, D): the student's states; labels (B, L): the original ids at the masked positions,
    -100 elsewhere. predict: the MLM head, (M, D) states -> (M, V) logits; only the M masked positions go
    through it (the numbers of ALBEF's full logits, ~7x less work on the vocabulary projection).
    teacher_logits(positions (B, L) bool) -> (M, V): the teacher's logits there, called without gradient
    and only when alpha != 0; None: no distillation. Every rank takes part in the token count, masked
    tokens or not; a rank with none returns a zero that keeps the graph connected.
    """
    positions = labels != -100  # (B, L)
    count = global_token_count(positions)
    if not bool(positions.any()):
        zero = hidden.sum() * 0.0
        return MLMLosses(zero, zero.detach(), zero.detach(), zero.detach())
    logits = predict(hidden[positions]).float()  # (M, V)
    teacher = None
    if alpha != 0 and teacher_logits is not None:
        with torch.no_grad():
            teacher = teacher_logits(positions)  # (M, V)
    return mlm_loss_from_logits(logits, labels[positions], count, alpha=alpha, teacher_logits=teacher)
