"""What one `CODIS.forward` returns: the loss, its terms, typed diagnostics and, on request, details.

`Diagnostics` holds the detached scalars a notebook or the training log reads (None where the term
is off in the model's mode); a misspelt name fails at once as an AttributeError instead of a missing
dict key. `Details` holds the large per-batch tensors (similarity matrices, Sinkhorn assignments),
kept only when `forward(..., return_details=True)` asks for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable

import torch

__all__ = ["CODISOutput", "Diagnostics", "Details"]


@dataclass
class Diagnostics:
    """Detached scalars of one forward; None where the term is not computed in the model's mode."""

    temperature: torch.Tensor | None = None  # tau of the contrastive softmax, after clamping
    align_itc: torch.Tensor | None = None  # (H_i2t + H_t2i) / 2, ALBEF's ITC (CLIP's loss in clip mode)
    align_unimodal: torch.Tensor | None = None  # (H_i2i + H_t2t) / 2, CODIS's unimodal pair
    align_i2t: torch.Tensor | None = None  # H_i2t: image student against text teacher columns
    align_t2i: torch.Tensor | None = None  # H_t2i
    align_i2i: torch.Tensor | None = None  # H_i2i (unimodal pair on)
    align_t2t: torch.Tensor | None = None  # H_t2t (unimodal pair on)
    code_t2p: torch.Tensor | None = None  # L_t2p: the text student predicts the image teacher's codes
    code_i2p: torch.Tensor | None = None  # L_i2p: the image student predicts the text teacher's codes
    ot_image: torch.Tensor | None = None  # transport cost of the image teacher features to the codebook
    ot_text: torch.Tensor | None = None  # the same for the text teacher features
    codebook_perplexity: float | None = None  # exp(entropy of the mean code prediction); K = uniform use
    hard_code_perplexity: float | None = None  # exp(entropy of the batch's arg-max code histogram)
    dead_codes: int | None = None  # codes that are the arg-max of no student feature in the batch
    itm_accuracy: torch.Tensor | None = None  # matching accuracy over the 3B ITM pairs
    mlm_accuracy: torch.Tensor | None = None  # accuracy over the masked tokens
    mlm_ce: torch.Tensor | None = None  # the cross-entropy part of L_mlm
    mlm_distill: torch.Tensor | None = None  # the teacher-distribution part of L_mlm (0 without distillation)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Return every diagnostic's name, in field order."""
        return tuple(f.name for f in fields(cls))

    def scalar_tensors(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Return the set diagnostics among `names` (default: all) as 0-d float32 tensors, without a host sync.

        The training loop stacks these with the losses for one all-reduce and one device-to-host copy.
        """
        known = self.names()
        chosen = known if names is None else tuple(names)
        unknown = [name for name in chosen if name not in known]
        if unknown:
            raise ValueError(f"unknown diagnostics {unknown}; Diagnostics has {list(known)}")
        out = {}
        for name in chosen:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                out[name] = value.detach().float().reshape(())
            elif value is not None:
                out[name] = torch.tensor(float(value))
        return out

    def scalars(self) -> dict[str, float]:
        """Return every set diagnostic as a Python float (one host sync per value), for printing or logging."""
        return {name: float(value) for name, value in self.scalar_tensors().items()}


@dataclass
class Details:
    """The large tensors of one forward, kept only with `return_details=True`; None where not computed."""

    sim_i2t: torch.Tensor | None = None  # (B, Bg [+ Q]) student image rows against text columns, / tau
    sim_t2i: torch.Tensor | None = None  # (B, Bg [+ Q]) student text rows against image columns, / tau
    sim_i2i: torch.Tensor | None = None  # (B, Bg + Q) unimodal pair (codis mode)
    sim_t2t: torch.Tensor | None = None
    assign_image: torch.Tensor | None = None  # (B, K) Sinkhorn assignment T_i2p of the image teacher features
    assign_text: torch.Tensor | None = None  # (B, K) T_t2p of the text teacher features


@dataclass
class CODISOutput:
    """Result of one forward: weighted total, unweighted terms, detached diagnostics, optional details."""

    loss: torch.Tensor  # scalar, sum of weighted active terms
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # keys among align, code, ot, itm, mlm
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    details: Details | None = None  # filled when forward is called with return_details=True
