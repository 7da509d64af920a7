"""T_i2p and T_t2p: the optimal-transport plans that assign each modality's teacher features to the codes.

The B teacher features of one modality (z_v^m for T_i2p, z_t^m for T_t2p) are sent to the K code
vectors by entropic optimal transport with equal partition (every sample sends 1/Bg, every code receives
1/K; Sinkhorn on exp(z^m C^T / eps), `codis_lib.ot.sinkhorn`). Each row of the plan, rescaled to sum to
1, is that sample's soft code assignment: the target of L_code and the weights of L_ot. No gradient
flows through a plan.
"""
from __future__ import annotations

import torch

from codis_lib.ot import sinkhorn

__all__ = ["check_features", "transport_assignments"]


def check_features(name: str, feat: torch.Tensor, codebook_weight: torch.Tensor) -> None:
    """Raise a ValueError naming `name` if feat is not (B, d) with d equal to the codebook width."""
    if feat.dim() != 2:
        raise ValueError(f"{name} must have shape (B, d), got {tuple(feat.shape)}")
    if feat.shape[1] != codebook_weight.shape[1]:
        raise ValueError(f"{name} has width {feat.shape[1]} but the codebook has width {codebook_weight.shape[1]}")
    if feat.shape[0] == 0:
        raise ValueError(f"{name} has B = 0 samples")


@torch.no_grad()
def transport_assignments(teacher_feat: torch.Tensor, codebook_weight: torch.Tensor, *, eps: float = 0.05,
                          n_iters: int = 3, log_domain: bool = False, distributed: bool = True) -> torch.Tensor:
    """Return the Sinkhorn assignment (B, K) of teacher features to codes (T_i2p or T_t2p), rows summing to 1.

    Computed in float32 without gradient over the global batch (marginals all-reduced under torchrun).
    """
    check_features("teacher_feat", teacher_feat, codebook_weight)
    scores = teacher_feat.detach().float() @ codebook_weight.detach().float().t()  # (B, K) cosine similarities
    return sinkhorn(scores, eps=eps, n_iters=n_iters, log_domain=log_domain, distributed=distributed)
