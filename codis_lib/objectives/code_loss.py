"""L_code = L_t2p + L_i2p: each modality's code probabilities predict the other modality's transport plan.

A student feature z predicts a distribution over the K codes, p = softmax(z C^T / tau_c)
(`code_probabilities`; the one place this is computed, also behind `CODIS.assign_codes`). The swapped
prediction is cross-modal: the text student predicts the image teacher's plan T_i2p,
L_t2p = -mean_i sum_k T_i2p[i, k] log p_t[i, k], and the image student predicts the text teacher's plan,
L_i2p = -mean_i sum_k T_t2p[i, k] log p_v[i, k]. The log comes from the same logits (`code_logits`)
through log-softmax (`soft_cross_entropy`), which is exact where log(p) would underflow. Gradients reach
the student encoders and the codebook.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from codis_lib.objectives.alignment import soft_cross_entropy  # the one soft-target cross-entropy
from codis_lib.objectives.transport_plans import check_features

__all__ = ["code_logits", "code_probabilities", "loss_code"]


def code_logits(feat: torch.Tensor, codebook_weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return z C^T / tau_c, (B, K): the student's code prediction before softmax."""
    check_features("feat", feat, codebook_weight)
    return feat @ codebook_weight.t() / temperature


def code_probabilities(feat: torch.Tensor, codebook_weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return p = softmax(z C^T / tau_c), (B, K), each row summing to 1: a feature's soft code assignment."""
    return F.softmax(code_logits(feat, codebook_weight, temperature), dim=-1)


def loss_code(image_feat: torch.Tensor, text_feat: torch.Tensor, image_plan: torch.Tensor,
              text_plan: torch.Tensor, codebook_weight: torch.Tensor,
              temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (L_code, L_t2p, L_i2p): cross-modal swapped prediction of the teachers' code assignments.

    image_feat, text_feat: student features (B, d). image_plan (T_i2p), text_plan (T_t2p): teacher
    assignments (B, K), rows summing to 1. L_t2p: the text student predicts the image teacher's plan;
    L_i2p: the image student predicts the text teacher's plan.
    """
    for name, plan in (("image_plan", image_plan), ("text_plan", text_plan)):
        if plan.shape != (image_feat.shape[0], codebook_weight.shape[0]):
            raise ValueError(f"{name} must have shape (B, K) = ({image_feat.shape[0]}, {codebook_weight.shape[0]}), "
                             f"got {tuple(plan.shape)}")
    if image_feat.shape != text_feat.shape:
        raise ValueError(f"image_feat {tuple(image_feat.shape)} and text_feat {tuple(text_feat.shape)} must match")
    text_logits = code_logits(text_feat, codebook_weight, temperature)  # (B, K)
    image_logits = code_logits(image_feat, codebook_weight, temperature)  # (B, K)
    loss_t2p = soft_cross_entropy(text_logits, image_plan.detach())
    loss_i2p = soft_cross_entropy(image_logits, text_plan.detach())
    return loss_t2p + loss_i2p, loss_t2p, loss_i2p
