"""L_align: the four teacher-student contrastive terms (i2t, t2i, i2i, t2t) and their soft cross-entropy.

For a student modality s and a teacher modality u (docs/METHOD.md, "L_align"):

    sim_s2u = z_s [z_u^m ; queue_u] / tau                                       (B, Bg + Q)
    y_s2u   = alpha softmax(z_s^m [z_u^m ; queue_u] / tau) + (1 - alpha) positives
    H_s2u   = mean over rows of -sum_j y_s2u[i, j] log softmax(sim_s2u)[i, j]   (`soft_cross_entropy`)

`distilled_alignment` computes H_i2t and H_t2i (ALBEF's ITC with momentum distillation) and, for CODIS,
H_i2i and H_t2t; `clip_alignment` is the in-batch variant without a teacher (mode "clip"). Both take
their ground truth from `positive_targets`. Pure functions of features: they know no encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codis_lib.distributed import all_gather_no_grad, all_gather_with_grad

__all__ = ["float32_region", "soft_cross_entropy", "positive_targets", "distilled_contrast", "AlignmentLosses",
           "clip_alignment", "distilled_alignment"]


def float32_region(device: torch.device) -> torch.autocast:
    """Return a context that switches autocast off: contrastive and OT math stays in float32.

    Contrastive logits are divided by tau ~ 0.07 and Sinkhorn by eps = 0.05, too sharp for bf16/fp16.
    """
    return torch.autocast(device_type=device.type, enabled=False)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return mean over rows of -sum_j targets[i, j] log softmax(logits)[i, j] (scalar).

    The one soft-target cross-entropy of the package: each H of L_align here, and L_code
    (`codis_lib.objectives.code_loss`) against the transport plans.
    """
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def positive_targets(batch: int, global_batch: int, offset: int, *, image_ids: torch.Tensor | None = None,
                     ids_all: torch.Tensor | None = None, queue_ids: torch.Tensor | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """Return the ground-truth target rows (B, Bg [+ Q]), each summing to 1.

    Without image ids row i's target is the paired column offset + i (one-hot). With image_ids (B,)
    and ids_all (Bg,) the mass is spread evenly over every column of the same image, queue columns
    included. queue_ids (Q,): the ids of the queue entries (-100: none); given, the rows also cover
    the Q queue columns, which are never positives without image ids.
    """
    if image_ids is None:
        width = global_batch + (queue_ids.numel() if queue_ids is not None else 0)
        targets = torch.zeros(batch, width, device=device)
        targets[torch.arange(batch, device=device), offset + torch.arange(batch, device=device)] = 1.0
        return targets
    if ids_all is None:
        raise ValueError("positive_targets: image_ids need ids_all, the image ids of the global batch")
    columns = torch.cat([ids_all, queue_ids]) if queue_ids is not None else ids_all  # (Bg [+ Q],)
    same = (image_ids[:, None] == columns[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def distilled_contrast(student_rows: torch.Tensor, teacher_rows: torch.Tensor, columns: torch.Tensor,
                       positives: torch.Tensor, alpha: float, temp: torch.Tensor,
                       student_columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (H, sim): one term H_s2u of L_align, and the student logits sim (B, C) it was computed from.

    sim = z_s [z_u^m ; queue_u] / tau; targets = alpha softmax(z_s^m [z_u^m ; queue_u] / tau)
    + (1 - alpha) positives. columns: (d, C) unit teacher features.
    student_columns (d, Bg), with gradient: when given, the student rows are scored against these in
    place of the first Bg (global-batch) teacher columns, as CLIP scores them; the targets still come
    from the teacher against its own columns (`ModelConfig.align_columns = "student"`).
    """
    if student_columns is not None:
        columns_scored = torch.cat([student_columns, columns[:, student_columns.shape[1]:]], dim=1)
    else:
        columns_scored = columns
    sim = student_rows @ columns_scored / temp  # (B, C)
    with torch.no_grad():
        sim_teacher = teacher_rows @ columns / temp
        targets = alpha * F.softmax(sim_teacher, dim=1) + (1 - alpha) * positives
    return soft_cross_entropy(sim, targets), sim


@dataclass
class AlignmentLosses:
    """L_align of one batch: the cross-modal mean, the unimodal mean (CODIS only) and each term."""

    itc: torch.Tensor  # (H_i2t + H_t2i) / 2, ALBEF's image-text contrastive loss
    unimodal: torch.Tensor | None  # (H_i2i + H_t2t) / 2; None when the unimodal pair is off
    terms: dict[str, torch.Tensor]  # H per direction: i2t, t2i [, i2i, t2t]
    sims: dict[str, torch.Tensor]  # the student logits of each direction, (B, Bg [+ Q]), already / tau

    @property
    def total(self) -> torch.Tensor:
        """Return L_align unweighted: itc, plus unimodal when that pair is on."""
        return self.itc if self.unimodal is None else self.itc + self.unimodal


def clip_alignment(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor, *, offset: int,
                   image_ids: torch.Tensor | None = None) -> AlignmentLosses:
    """Return CLIP's symmetric in-batch contrastive loss over the global batch, student features only.

    image_feat, text_feat: this rank's unit features (B, d); the columns are the features of the global
    batch, gathered with gradient. Targets are one-hot, or spread over shared image ids.
    """
    image_all = all_gather_with_grad(image_feat)  # (Bg, d)
    text_all = all_gather_with_grad(text_feat)
    ids_all = all_gather_no_grad(image_ids) if image_ids is not None else None
    targets = positive_targets(image_feat.shape[0], image_all.shape[0], offset, image_ids=image_ids,
                               ids_all=ids_all, device=image_feat.device)  # (B, Bg)
    sim_i2t = image_feat @ text_all.t() / temp
    sim_t2i = text_feat @ image_all.t() / temp
    loss_i2t, loss_t2i = soft_cross_entropy(sim_i2t, targets), soft_cross_entropy(sim_t2i, targets)
    return AlignmentLosses(itc=(loss_i2t + loss_t2i) / 2, unimodal=None, terms={"i2t": loss_i2t, "t2i": loss_t2i},
                           sims={"i2t": sim_i2t, "t2i": sim_t2i})


def distilled_alignment(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_teacher: torch.Tensor,
                        text_feat_teacher: torch.Tensor, image_columns: torch.Tensor, text_columns: torch.Tensor,
                        positives: torch.Tensor, alpha: float, temp: torch.Tensor, *,
                        unimodal: bool, student_columns: bool = False) -> AlignmentLosses:
    """Return L_align with momentum distillation: i2t and t2i, plus i2i and t2t when `unimodal`.

    image_feat, text_feat: student features (B, d); *_teacher: the teacher's features of the same rows;
    image_columns, text_columns: (d, Bg + Q) teacher features of the global batch and the queue;
    positives: (B, Bg + Q) from `positive_targets`. student_columns: i2t and t2i score the global batch's
    student features (gathered with gradient) instead of the teacher's; the queue and the targets stay
    the teacher's, and i2i / t2t keep teacher columns (a student column would be the row itself).
    """
    terms, sims = {}, {}
    image_all = all_gather_with_grad(image_feat).t() if student_columns else None  # (d, Bg)
    text_all = all_gather_with_grad(text_feat).t() if student_columns else None
    pairs = [("i2t", image_feat, image_feat_teacher, text_columns, text_all),
             ("t2i", text_feat, text_feat_teacher, image_columns, image_all)]
    if unimodal:
        pairs += [("i2i", image_feat, image_feat_teacher, image_columns, None),
                  ("t2t", text_feat, text_feat_teacher, text_columns, None)]
    for name, student_rows, teacher_rows, columns, own_columns in pairs:
        terms[name], sims[name] = distilled_contrast(student_rows, teacher_rows, columns, positives, alpha, temp,
                                                     student_columns=own_columns)
    itc = (terms["i2t"] + terms["t2i"]) / 2
    return AlignmentLosses(itc=itc, unimodal=(terms["i2i"] + terms["t2t"]) / 2 if unimodal else None, terms=terms,
                           sims=sims)
