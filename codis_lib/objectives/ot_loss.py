"""L_ot: the transport cost of each modality's teacher features against the codebook, under its plan.

L_ot = L_ot(z_v^m, C) + L_ot(z_t^m, C), with L_ot(z^m, C) = sum_{i,k} T[i, k] (1 - z^m_i . c_k) and T
the modality's plan (T_i2p or T_t2p) rescaled to total mass 1. The teacher features are detached and
the plan carries no gradient, so this term moves the codebook only: it pulls each code towards the
teacher features transported to it.
"""
from __future__ import annotations

import torch

from codis_lib.objectives.transport_plans import check_features
from codis_lib.ot import ot_cost

__all__ = ["loss_ot"]


def loss_ot(teacher_feat: torch.Tensor, codebook_weight: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """Return the OT cost sum_{i,k} T[i,k] (1 - z^m_i . c_k), T normalised to mass 1 (scalar).

    The teacher features are detached, so the gradient reaches the codebook only.
    """
    check_features("teacher_feat", teacher_feat, codebook_weight)
    cost = 1.0 - teacher_feat.detach().float() @ codebook_weight.float().t()  # (B, K)
    return ot_cost(plan, cost)
