"""The multimodal codebook of CODIS: K shared code vectors, the codebook terms of one step, its usage.

- `Codebook`: C, a (K, d) matrix of code vectors whose rows are re-normalised to unit length at the
  start of every training step.
- `codebook_losses`: the poster's codebook terms of one batch, each computed by its own file of
  `codis_lib.objectives`: the plans T_i2p, T_t2p (`transport_plans`), L_code (`code_loss`) and L_ot
  (`ot_loss`).
- `codebook_usage`: perplexity and dead codes of soft assignments (plans or code probabilities).
- `random_occupancy`: what the same hard-code statistics give for codes drawn uniformly at random (the
  yardstick: n random throws into K codes leave about K (1 - 1/K)^n of them empty).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from codis_lib.objectives.code_loss import code_logits, loss_code
from codis_lib.objectives.ot_loss import loss_ot
from codis_lib.objectives.transport_plans import transport_assignments

__all__ = ["Codebook", "CodebookLosses", "codebook_usage", "codebook_losses", "hard_code_perplexity",
           "random_occupancy"]


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
    """Return L_code and L_ot (with their parts and the plans T_i2p, T_t2p) for one batch (docs/METHOD.md)."""
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
def hard_code_perplexity(codes: torch.Tensor, num_codes: int) -> float:
    """Return exp(entropy of the histogram of hard codes `codes` (N,) over `num_codes` codes) (0 log 0 = 0)."""
    share = torch.bincount(codes.flatten(), minlength=num_codes).double() / codes.numel()
    share = share[share > 0]
    return float(torch.exp(-(share * share.log()).sum()))


def random_occupancy(n: int, num_codes: int, draws: int = 200, seed: int = 0) -> dict[str, float]:
    """Return the hard-code statistics of n codes drawn uniformly among `num_codes`, over `draws` seeded draws.

    perplexity / perplexity_sd: mean and standard deviation of the hard-code perplexity (below K: counts
    fluctuate); dead_codes: the exact expected number of codes nobody draws, K (1 - 1/K)^n.
    """
    if n < 1 or num_codes < 1 or draws < 2:
        raise ValueError(f"random_occupancy needs n >= 1, num_codes >= 1, draws >= 2; got {n}, {num_codes}, {draws}")
    throws = torch.randint(num_codes, (draws, n), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(draws, num_codes, dtype=torch.float64).scatter_add_(
        1, throws, torch.ones(draws, n, dtype=torch.float64))
    share = counts / n
    values = torch.exp(-(share * share.clamp_min(1e-300).log()).sum(dim=1))
    return {"perplexity": float(values.mean()), "perplexity_sd": float(values.std()),
            "dead_codes": num_codes * (1 - 1 / num_codes) ** n}


def codebook_usage(assignments: torch.Tensor) -> dict[str, float]:
    """Return usage diagnostics of soft assignments (B, K): perplexity, hard-code perplexity, dead and active codes.

    perplexity: exp(entropy of the mean assignment); K when every code is used equally, 1 when all
    samples go to one code. It stays near K when every row is nearly uniform, however the arg-max codes
    crowd: hard_perplexity is the same of the arg-max codes' histogram (compare it with
    `random_occupancy(B, K)`). dead_codes: codes that are the most likely code of no sample.
    """
    if assignments.dim() != 2 or assignments.shape[0] == 0:
        raise ValueError(f"assignments must have shape (B, K) with B > 0, got {tuple(assignments.shape)}")
    probs = assignments.float()
    probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
    mean = probs.mean(dim=0)  # (K,)
    entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    winners = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1])
    active = int((winners > 0).sum())
    return {"perplexity": float(torch.exp(entropy)), "hard_perplexity": hard_code_perplexity(probs.argmax(dim=1),
            probs.shape[1]), "dead_codes": probs.shape[1] - active, "active_codes": active}
