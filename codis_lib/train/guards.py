"""Non-finite guards of the training loop: no update from a NaN/inf gradient, no checkpoint of a NaN/inf state.

Three checks, each raising a `NonFiniteLossError` (the CLI's exit status 1) that names the step and what
went wrong, so a diverging run stops before it can poison its weights or its checkpoints:

- `check_loss_terms`: every loss term of a forward, before backward (the engine's `_stop_if_non_finite`);
- `check_gradients`: the gradients of the step, after backward and before the optimizer step. In fp32
  and bf16 a NaN/inf gradient stops the run naming the first parameters that hold one. With the fp16
  grad scaler an overflow is the scaler's normal signal (it skips the update and halves the scale), so
  there the guard watches the loss scale instead (`check_loss_scale`): a scale that is no longer finite
  or has fallen below `MIN_LOSS_SCALE` means the gradients overflow even unscaled, and the run stops;
- `check_state`: the model's parameters and buffers and the optimizer's state, before any checkpoint
  is written (and after a checkpoint is loaded), naming the first offending tensors.

The fast path of each check is one fused reduction and one device-to-host copy; names are looked up
only once something is known to be wrong.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["NonFiniteLossError", "NonFiniteGradientError", "NonFiniteStateError", "MIN_LOSS_SCALE",
           "non_finite_names", "check_gradients", "check_loss_scale", "check_state", "state_tensors"]

MIN_LOSS_SCALE = 1.0  # below this the fp16 gradients overflow at their true size (DeepSpeed's default minimum)
SHOWN_NAMES = 5  # offending parameters named in a message


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term was NaN or infinite; `.term`, `.step`, `.checkpoint` say where."""

    def __init__(self, message: str, *, term: str, step: int, epoch: int, checkpoint: Path | None):
        super().__init__(message)
        self.term, self.step, self.epoch, self.checkpoint = term, step, epoch, checkpoint


class NonFiniteGradientError(NonFiniteLossError):
    """Training stopped before an update because a gradient (or the fp16 loss scale) was not finite.

    `.names` lists the first parameters whose gradient holds a NaN or inf (empty for a loss-scale stop).
    """

    def __init__(self, message: str, *, names: list[str], step: int, epoch: int, checkpoint: Path | None):
        super().__init__(message, term="gradient", step=step, epoch=epoch, checkpoint=checkpoint)
        self.names = names


class NonFiniteStateError(NonFiniteLossError):
    """A checkpoint was not written (or not loaded) because the training state holds NaN/inf; `.names` says where."""

    def __init__(self, message: str, *, names: list[str], step: int, epoch: int, checkpoint: Path | None):
        super().__init__(message, term="state", step=step, epoch=epoch, checkpoint=checkpoint)
        self.names = names


def non_finite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = SHOWN_NAMES) -> tuple[list[str], int]:
    """Return (the first `limit` names whose floating tensor holds a NaN/inf, how many do in all).

    One fused norm per tensor group and a single host copy decide whether any is bad (the norm of a
    tensor with a NaN or inf is NaN or inf); only then is each flagged tensor checked exactly, so a
    finite tensor whose norm merely overflows is not reported.
    """
    pairs = [(name, t.detach()) for name, t in named if t is not None and torch.is_floating_point(t) and t.numel()]
    if not pairs:
        return [], 0
    norms = torch._foreach_norm([t for _, t in pairs])
    finite = torch.isfinite(torch.stack([n.reshape(()).to(norms[0].device) for n in norms]))
    if bool(finite.all()):
        return [], 0
    bad = [name for (name, t), ok in zip(pairs, finite.tolist()) if not ok and not bool(torch.isfinite(t).all())]
    return bad[:limit], len(bad)


def _listing(names: list[str], count: int) -> str:
    more = f" and {count - len(names)} more" if count > len(names) else ""
    return ", ".join(names) + more


def _where(checkpoint: Path | None) -> str:
    return (f"the last good checkpoint is {checkpoint} (--resume continues from it; a lower train.optimizer.lr "
            f"is a new run from it: --set train.init_from={checkpoint} and a new --output-dir)"
            if checkpoint is not None else "no checkpoint had been written yet")


def check_gradients(model: torch.nn.Module, *, step: int, epoch: int, lr: float, checkpoint: Path | None) -> None:
    """Raise NonFiniteGradientError naming the first parameters of optimizer step `step` with a NaN/inf gradient.

    Call it after backward (and after unscaling, when there is a scaler) and before the optimizer step.
    """
    names, count = non_finite_names((name, p.grad) for name, p in model.named_parameters() if p.grad is not None)
    if not count:
        return
    raise NonFiniteGradientError(
        f"non-finite gradient at step {step} (epoch {epoch}, lr {lr:.3g}) in {count} parameter(s): "
        f"{_listing(names, count)}. Training stopped before the update; {_where(checkpoint)}.",
        names=names, step=step, epoch=epoch, checkpoint=checkpoint)


def check_loss_scale(scale: float, *, step: int, epoch: int, lr: float, checkpoint: Path | None) -> None:
    """Raise NonFiniteGradientError when the fp16 loss scale after step `step` is not finite or below MIN_LOSS_SCALE."""
    if math.isfinite(scale) and scale >= MIN_LOSS_SCALE:
        return
    raise NonFiniteGradientError(
        f"fp16 loss scale {scale:g} after step {step} (epoch {epoch}, lr {lr:.3g}): the gradients overflow even "
        f"unscaled (minimum scale {MIN_LOSS_SCALE:g}); the overflowing steps were skipped, not applied. "
        f"Training stopped; {_where(checkpoint)}; bf16 or fp32 (train.precision) avoid fp16's range.",
        names=[], step=step, epoch=epoch, checkpoint=checkpoint)


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the model's state (parameters and buffers) and the optimizer's per-parameter state."""
    yield from model.state_dict(keep_vars=False).items()
    if optimizer is None:
        return
    names = {id(p): name for name, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield f"optimizer[{names.get(id(param), '?')}].{key}", value


def check_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, step: int, epoch: int,
                what: str, checkpoint: Path | None) -> None:
    """Raise NonFiniteStateError naming the first NaN/inf tensors of the model and optimizer state.

    `what` says what was about to happen ("checkpoint_00000003.pt was not written"), for the message.
    """
    names, count = non_finite_names(state_tensors(model, optimizer))
    if not count:
        return
    raise NonFiniteStateError(
        f"non-finite training state at step {step} (epoch {epoch}) in {count} tensor(s): {_listing(names, count)}; "
        f"{what}; {_where(checkpoint)}.", names=names, step=step, epoch=epoch, checkpoint=checkpoint)
