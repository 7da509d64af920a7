"""Learning-rate schedule, alpha ramp and AdamW parameter groups follow ALBEF / docs/METHOD.md."""
import math

import pytest
import torch

from codis_lib.train.schedule import (WarmupCosineSchedule, adamw_param_groups, alpha_at_step, build_adamw,
                                      effective_warmup_steps, lr_at_step)


def test_albef_curve_warms_up_from_1e5_to_peak_then_cosines_to_min():
    total = 10_000
    kwargs = dict(lr=1e-4, warmup_lr=1e-5, warmup_steps=2000, min_lr=1e-5)
    assert lr_at_step(0, total, **kwargs) == pytest.approx(1e-5)
    assert lr_at_step(1000, total, **kwargs) == pytest.approx(5.5e-5)  # half-way up the linear warm-up
    assert lr_at_step(2000, total, **kwargs) == pytest.approx(1e-4)
    midpoint = 2000 + (total - 2000 - 1) / 2
    assert lr_at_step(int(midpoint), total, **kwargs) == pytest.approx(5.5e-5, rel=1e-3)
    assert lr_at_step(total - 1, total, **kwargs) == pytest.approx(1e-5)
    lrs = [lr_at_step(s, total, **kwargs) for s in range(2000, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after the warm-up


def test_warmup_is_clamped_to_a_fraction_of_short_runs():
    assert effective_warmup_steps(2000, 300, 0.1) == 30
    assert effective_warmup_steps(2000, 1_000_000, 0.1) == 2000


def test_schedule_object_sets_group_lrs_and_round_trips_its_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=123.0)
    schedule = WarmupCosineSchedule(optimizer, total_steps=100, lr=1e-3, warmup_lr=1e-5, warmup_steps=10, min_lr=1e-6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    for _ in range(37):
        schedule.step()
    expected = lr_at_step(37, 100, lr=1e-3, warmup_lr=1e-5, warmup_steps=10, min_lr=1e-6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    restored = WarmupCosineSchedule(torch.optim.AdamW(model.parameters()), total_steps=100, lr=1e-3,
                                    warmup_lr=1e-5, warmup_steps=10, min_lr=1e-6)
    restored.load_state_dict(schedule.state_dict())
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_alpha_ramps_linearly_over_the_first_epoch_then_stays():
    assert alpha_at_step(0, 50, alpha=0.4) == 0.0
    assert alpha_at_step(25, 50, alpha=0.4) == pytest.approx(0.2)
    assert alpha_at_step(50, 50, alpha=0.4) == pytest.approx(0.4)
    assert alpha_at_step(500, 50, alpha=0.4) == pytest.approx(0.4)
    assert alpha_at_step(0, 50, alpha=0.4, ramp_epochs=0) == pytest.approx(0.4)


def test_no_weight_decay_on_biases_and_1d_parameters_and_frozen_teacher_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model.temp = torch.nn.Parameter(torch.tensor(0.07))  # 0-d, as the learnable temperature
    teacher = torch.nn.Linear(4, 4)
    teacher.requires_grad_(False)
    model.teacher = teacher
    decay, no_decay = adamw_param_groups(model, weight_decay=0.02)
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert decay_ids == {id(model[0].weight), id(model[2].weight)}
    assert no_decay_ids == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias),
                            id(model.temp)}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    optimizer = build_adamw(model, lr=1e-4, weight_decay=0.02)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 7  # teacher weight and bias excluded
    assert not math.isnan(optimizer.param_groups[0]["lr"])
