"""Learning-rate schedule, alpha ramp and AdamW parameter groups, as ALBEF trains.

ALBEF (configs/Pretrain.yaml) warms the learning rate up linearly from `warmup_lr` = 1e-5 to `lr` =
1e-4 over the first 2000 iterations, then follows a cosine from `lr` down to `min_lr` = 1e-5 over
the remaining epochs, as docs/METHOD.md states it. ALBEF steps its timm cosine once per epoch and calls it
with `epoch + warmup_epochs`, which (read literally) starts the cosine 20 "epochs" into its 30-epoch
cycle; we follow docs/METHOD.md's plain curve instead and evaluate it per optimizer step, which is smoother
and makes tiny runs (a few hundred steps) meaningful. For such runs the warm-up is clamped so it
never exceeds a fraction of the run (see `effective_warmup_steps`).

The distillation weight alpha (docs/METHOD.md) ramps linearly from 0 to its final value over the first
epoch, as ALBEF's `alpha * min(1, i / len(data_loader))`: the teacher is random at the start, so its
soft targets are not trusted until the student has learned something.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch


def lr_at_step(step: int, total_steps: int, *, lr: float, warmup_lr: float, warmup_steps: int,
               min_lr: float) -> float:
    """Return the learning rate for optimizer step `step` (0-based): linear warm-up, then cosine.

    Steps 0..warmup_steps go linearly from `warmup_lr` to `lr`; the remaining steps follow
    min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2 with progress from 0 to 1 at the last step.
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def effective_warmup_steps(warmup_steps: int, total_steps: int, max_warmup_fraction: float) -> int:
    """Return `warmup_steps` clamped to `max_warmup_fraction` of the run.

    ALBEF's 2000 warm-up steps are ~0.2 % of its 30-epoch run; a 300-step emoji run with the same
    number would never leave the warm-up. Clamping keeps the shape of the schedule at any length.
    """
    return int(min(warmup_steps, math.floor(max_warmup_fraction * total_steps)))


class WarmupCosineSchedule:
    """Sets the learning rate of every parameter group from `lr_at_step` at each optimizer step.

    Its state is just the step counter, so checkpoints restore it exactly (`state_dict` /
    `load_state_dict`), and the curve can be recomputed from the config at any time.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, total_steps: int, lr: float, warmup_lr: float,
                 warmup_steps: int, min_lr: float, max_warmup_fraction: float = 0.1):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.lr, self.warmup_lr, self.min_lr = lr, warmup_lr, min_lr
        self.warmup_steps = effective_warmup_steps(warmup_steps, total_steps, max_warmup_fraction)
        self.step_count = 0
        self._apply()

    def current_lr(self) -> float:
        """Return the learning rate in effect for the next optimizer step."""
        return lr_at_step(self.step_count, self.total_steps, lr=self.lr, warmup_lr=self.warmup_lr,
                          warmup_steps=self.warmup_steps, min_lr=self.min_lr)

    def _apply(self) -> None:
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        """Advance to the next optimizer step and set its learning rate."""
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        """Return the schedule's state (its step counter and the curve's constants)."""
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step counter saved by `state_dict` and set the matching learning rate."""
        self.step_count = int(state["step_count"])
        self._apply()


def alpha_at_step(step: int, steps_per_epoch: int, *, alpha: float, ramp_epochs: float = 1.0) -> float:
    """Return the distillation weight at optimizer step `step`: linear from 0 over `ramp_epochs` epochs."""
    ramp_steps = ramp_epochs * steps_per_epoch
    if ramp_steps <= 0:
        return alpha
    return alpha * min(1.0, step / ramp_steps)


def is_no_decay_parameter(name: str, param: torch.nn.Parameter) -> bool:
    """Return True for parameters AdamW must not decay: biases and every 1-d (or 0-d) tensor.

    This is ALBEF's (timm's) rule: LayerNorm gains/biases, biases, the learnable temperature.
    """
    return param.ndim <= 1 or name.endswith(".bias")


def adamw_param_groups(model: torch.nn.Module, weight_decay: float,
                       lr_scales: Mapping[str, float] | None = None) -> list[dict]:
    """Return AdamW parameter groups [decayed, not decayed, then one per `lr_scales` entry] over `model`.

    Frozen parameters (the momentum teacher, updated by EMA) are left out of the optimizer.
    lr_scales: {parameter name: factor}; each named parameter gets a group of its own, without weight
    decay, whose learning rate is the schedule's times the factor (`WarmupCosineSchedule` reads `lr_scale`).
    """
    lr_scales = dict(lr_scales or {})
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(set(lr_scales) - trainable)
    if missing:
        raise ValueError(f"lr_scales names {', '.join(missing)}, not trainable parameters of the model")
    decay, no_decay = [], []
    own = {name: [] for name in lr_scales}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in own:
            own[name].append(param)
        else:
            (no_decay if is_no_decay_parameter(name, param) else decay).append(param)
    return ([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
            + [{"params": params, "weight_decay": 0.0, "lr_scale": lr_scales[name]} for name, params in own.items()])


def build_adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                eps: float = 1e-8, fused: bool | None = None, temp_lr: float | None = None) -> torch.optim.AdamW:
    """Return AdamW over `model` with ALBEF's parameter groups (no decay on biases and 1-d params).

    temp_lr: None trains the temperature `temp` at the model's learning rate; a number gives it a group
    of its own whose peak learning rate is temp_lr (the same warm-up + cosine, scaled by temp_lr / lr).
    """
    lr_scales = {} if temp_lr is None else {"temp": temp_lr / lr}
    groups = adamw_param_groups(model, weight_decay, lr_scales)
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)
