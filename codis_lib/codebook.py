"""The multimodal codebook of CODIS: shared cluster centres, code prediction, L_code and L_ot.

docs/METHOD.md, items 2-5:
- C is a (K, d) matrix of code vectors whose rows are re-normalised to unit length every step.
- A student feature z predicts a distribution over codes, p = softmax(z C^T / tau_c).
- The *teacher* features of each modality are assigned to codes by entropic optimal transport
  (Sinkhorn, equal partition), giving soft targets T_i2p (from images) and T_t2p (from texts).
- L_code = L_t2p + L_i2p is a cross-modal swapped prediction: the text student predicts the image
  teacher's assignment and the image student predicts the text teacher's.
- L_ot is the transport cost of the teacher features against the codebook. Teacher features carry
  no gradient, so this term moves the codebook only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from codis_lib.ot import ot_cost, sinkhorn

__all__ = ["Codebook", "CodebookLosses", "soft_cross_entropy", "code_logits", "transport_assignments", "loss_code", "loss_ot",
           "codebook_usage", "codebook_losses"]


class Codebook(nn.Module):
    """K learnable code vectors of width d, kept on the unit sphere."""

    def __init__(self, num_codes: int, dim: int, temperature: float = 0.1):
        super().__init__()
        if num_codes < 1:
            raise ValueError(f"num_codes (K) must be >= 1, got {num_codes}")
        if dim < 1:
            raise ValueError(f"dim (d) must be >= 1, got {dim}")
        if not temperature > 0:
            raise ValueError(f"temperature (tau_c) must be > 0, got {temperature}")
        self.num_codes = num_codes
        self.dim = dim
        self.temperature = temperature
        self.weight = nn.Parameter(F.normalize(torch.randn(num_codes, dim), dim=1))  # (K, d)

    @torch.no_grad()
    def normalize_(self) -> None:
        """Re-project every code onto the unit sphere in place (called at the start of each step, as SwAV)."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """Return code logits z C^T / tau_c, (B, K), for unit-norm features (B, d)."""
        return code_logits(feat, self.weight, self.temperature)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, temperature={self.temperature}"


def _check_features(name: str, feat: torch.Tensor, codebook_weight: torch.Tensor) -> None:
    """Raise a ValueError naming `name` if feat is not (B, d) with d equal to the codebook width."""
    if feat.dim() != 2:
        raise ValueError(f"{name} must have shape (B, d), got {tuple(feat.shape)}")
    if feat.shape[1] != codebook_weight.shape[1]:
        raise ValueError(f"{name} has width {feat.shape[1]} but the codebook has width {codebook_weight.shape[1]}")
    if feat.shape[0] == 0:
        raise ValueError(f"{name} has B = 0 samples")


def code_logits(feat: torch.Tensor, codebook_weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return z C^T / tau_c, (B, K): the student's code prediction before softmax."""
    _check_features("feat", feat, codebook_weight)
    return feat @ codebook_weight.t() / temperature


@torch.no_grad()
def transport_assignments(teacher_feat: torch.Tensor, codebook_weight: torch.Tensor, *, eps: float = 0.05,
                          n_iters: int = 3, log_domain: bool = False, distributed: bool = True) -> torch.Tensor:
    """Return the Sinkhorn assignment (B, K) of teacher features to codes, each row summing to 1.

    Computed in float32 without gradient over the global batch (marginals all-reduced under torchrun).
    """
    _check_features("teacher_feat", teacher_feat, codebook_weight)
    scores = teacher_feat.detach().float() @ codebook_weight.detach().float().t()  # (B, K) cosine similarities
    return sinkhorn(scores, eps=eps, n_iters=n_iters, log_domain=log_domain, distributed=distributed)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return mean over rows of -sum_j targets[i, j] log softmax(logits)[i, j] (scalar).

    The one soft-target cross-entropy of the package: L_code here, L_align in codis_lib.losses.
    """
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


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


def loss_ot(teacher_feat: torch.Tensor, codebook_weight: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """Return the OT cost sum_{i,k} T[i,k] (1 - z^m_i . c_k), T normalised to mass 1 (scalar).

    The teacher features are detached, so the gradient reaches the codebook only.
    """
    _check_features("teacher_feat", teacher_feat, codebook_weight)
    cost = 1.0 - teacher_feat.detach().float() @ codebook_weight.float().t()  # (B, K)
    return ot_cost(plan, cost)


@dataclass
class CodebookLosses:
    """Every codebook term of one step, plus the assignments for diagnostics."""

    code: torch.Tensor  # L_code = L_t2p + L_i2p
    code_t2p: torch.Tensor
    code_i2p: torch.Tensor
    ot: torch.Tensor  # L_ot(image) + L_ot(text)
    ot_image: torch.Tensor
    ot_text: torch.Tensor
    image_plan: torch.Tensor  # (B, K) T_i2p
    text_plan: torch.Tensor  # (B, K) T_t2p


def codebook_losses(codebook: Codebook, image_feat: torch.Tensor, text_feat: torch.Tensor,
                    image_feat_teacher: torch.Tensor, text_feat_teacher: torch.Tensor, *, eps: float = 0.05,
                    n_iters: int = 3, log_domain: bool = False, distributed: bool = True) -> CodebookLosses:
    """Return L_code and L_ot (with their parts and the plans) for one batch, as docs/METHOD.md items 3-5."""
    image_plan = transport_assignments(image_feat_teacher, codebook.weight, eps=eps, n_iters=n_iters,
                                       log_domain=log_domain, distributed=distributed)
    text_plan = transport_assignments(text_feat_teacher, codebook.weight, eps=eps, n_iters=n_iters,
                                      log_domain=log_domain, distributed=distributed)
    code, t2p, i2p = loss_code(image_feat, text_feat, image_plan, text_plan, codebook.weight, codebook.temperature)
    ot_image = loss_ot(image_feat_teacher, codebook.weight, image_plan)
    ot_text = loss_ot(text_feat_teacher, codebook.weight, text_plan)
    return CodebookLosses(code=code, code_t2p=t2p, code_i2p=i2p, ot=ot_image + ot_text, ot_image=ot_image,
                          ot_text=ot_text, image_plan=image_plan, text_plan=text_plan)


@torch.no_grad()
def codebook_usage(assignments: torch.Tensor) -> dict[str, float]:
    """Return usage diagnostics of soft assignments (B, K): perplexity, dead and active code counts.

    perplexity: exp(entropy of the mean assignment); K when every code is used equally, 1 when all
    samples go to one code. dead_codes: codes that are the most likely code of no sample.
    """
    if assignments.dim() != 2 or assignments.shape[0] == 0:
        raise ValueError(f"assignments must have shape (B, K) with B > 0, got {tuple(assignments.shape)}")
    probs = assignments.float()
    probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
    mean = probs.mean(dim=0)  # (K,)
    entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    winners = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1])
    active = int((winners > 0).sum())
    return {"perplexity": float(torch.exp(entropy)), "dead_codes": probs.shape[1] - active, "active_codes": active}
