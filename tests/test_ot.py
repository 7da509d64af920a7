"""codis_lib.ot against POT, against a step-by-step reference, in low precision and with bad input."""
import math

import numpy as np
import ot as pot
import pytest
import torch
import torch.nn.functional as F

from codis_lib.ot import ot_cost, sinkhorn, sinkhorn_log, sinkhorn_reference, sinkhorn_with_info


def cosine_scores(batch: int, codes: int, dim: int = 16, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Cosine similarities (B, K) between random unit features and random unit codes."""
    gen = torch.Generator().manual_seed(seed)
    feat = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    code = F.normalize(torch.randn(codes, dim, generator=gen, dtype=torch.float64), dim=1)
    return (feat @ code.t()).to(dtype)


def pot_plan(scores: torch.Tensor, eps: float, log: bool = False) -> np.ndarray:
    """POT's converged entropic plan for uniform marginals, rescaled so each row sums to 1."""
    batch, codes = scores.shape
    a, b = np.full(batch, 1.0 / batch), np.full(codes, 1.0 / codes)
    cost = -scores.double().numpy()
    if log:
        plan = pot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=100_000, stopThr=1e-14)
    else:
        plan = pot.sinkhorn(a, b, cost, eps, numItermax=100_000, stopThr=1e-14)
    return plan * batch


@pytest.mark.parametrize("batch,codes", [(8, 4), (64, 16), (33, 7), (50, 200)])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("log_domain", [False, True])
def test_converged_plan_matches_pot(batch, codes, eps, log_domain):
    scores = cosine_scores(batch, codes, seed=batch + codes)
    result = sinkhorn_with_info(scores, eps, None, tol=1e-12, log_domain=log_domain)
    reference = pot_plan(scores, eps, log=log_domain)
    assert result.marginal_error <= 1e-12
    np.testing.assert_allclose(result.plan.numpy(), reference, atol=1e-6, rtol=0)
    # Rows sum to 1 and every code receives B/K of the row-normalised mass.
    np.testing.assert_allclose(result.plan.sum(1).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(result.plan.sum(0).numpy(), batch / codes, atol=1e-6)


def test_converged_float32_plan_matches_pot():
    scores = cosine_scores(128, 32, seed=3, dtype=torch.float32)
    plan = sinkhorn(scores, 0.05, None, tol=1e-7)
    assert plan.dtype == torch.float32
    np.testing.assert_allclose(plan.double().numpy(), pot_plan(scores, 0.05), atol=2e-6, rtol=0)


@pytest.mark.parametrize("n_iters", [1, 3, 10])
@pytest.mark.parametrize("log_domain", [False, True])
def test_fixed_iterations_equal_step_by_step_reference(n_iters, log_domain):
    scores = cosine_scores(40, 12, seed=n_iters)
    plan = sinkhorn(scores, 0.05, n_iters, log_domain=log_domain)
    np.testing.assert_allclose(plan.numpy(), sinkhorn_reference(scores, 0.05, n_iters).numpy(), atol=1e-10, rtol=0)


def test_three_iterations_are_not_yet_converged():
    # Guards the test above: with too few iterations the plan must differ from the converged one.
    scores = cosine_scores(40, 12, seed=7)
    assert (sinkhorn(scores, 0.05, 1) - sinkhorn(scores, 0.05, None, tol=1e-12)).abs().max() > 1e-4


def test_log_domain_is_finite_where_the_plain_one_overflows():
    scores = cosine_scores(64, 16, seed=11, dtype=torch.float32)
    eps = 0.002
    # In float32, exp(score / 0.002) overflows for any score above 0.18, and no single shift keeps
    # every row's largest kernel entry above the underflow limit (scores span 1.5 = 750 eps).
    assert not torch.isfinite(sinkhorn_reference(scores, eps, 3, dtype=torch.float32)).all()
    with pytest.raises(FloatingPointError, match="log_domain=True"):
        sinkhorn(scores, eps, 3)
    plan = sinkhorn_log(scores, eps, 3)
    assert torch.isfinite(plan).all()
    np.testing.assert_allclose(plan.sum(1).numpy(), 1.0, atol=1e-5)
    # The float32 log-domain plan equals the step-by-step loop run in float64, where it does not overflow.
    np.testing.assert_allclose(plan.double().numpy(), sinkhorn_reference(scores, eps, 3).numpy(), atol=1e-5, rtol=0)
    # And run to convergence it is POT's log-domain plan (a small problem: eps this small converges slowly).
    eps = 0.005
    small = cosine_scores(12, 4, seed=11)
    converged = sinkhorn_log(small, eps, None, tol=1e-12, max_iters=50_000)
    np.testing.assert_allclose(converged.numpy(), pot_plan(small, eps, log=True), atol=1e-6, rtol=0)


def test_plain_solver_shift_and_its_fallback_give_the_reference_plan():
    # The kernel is shifted by the first row's maximum (a constant factor that cancels). At eps=0.005
    # the unshifted float32 loop overflows, yet the shifted plain solver is exact ...
    scores = cosine_scores(64, 16, seed=11, dtype=torch.float32)
    assert not torch.isfinite(sinkhorn_reference(scores, 0.005, 3, dtype=torch.float32)).all()
    np.testing.assert_allclose(sinkhorn(scores, 0.005, 3).double().numpy(),
                               sinkhorn_reference(scores, 0.005, 3).numpy(), atol=1e-6, rtol=0)
    # ... and when another score exceeds the first row's maximum by more than ~88 eps (exp overflows)
    # the kernel is rebuilt shifting each code by its own maximum: same plan as the float64 loop.
    high = scores * 4.0  # scores up to ~3 = 60 eps at eps=0.05
    high[:, 3] = -5.0
    high[0] = -5.0
    high[0, 3] = -4.5  # the first row's maximum, 150 eps below the top score; code 3's best sample
    with torch.no_grad():
        assert not torch.isfinite(torch.exp((high - high[0].max()) / 0.05)).all()
    np.testing.assert_allclose(sinkhorn(high, 0.05, 3).double().numpy(),
                               sinkhorn_reference(high.double(), 0.05, 3).numpy(), atol=1e-6, rtol=0)


def test_minus_inf_scores_forbid_a_pair():
    scores = cosine_scores(16, 8, seed=5, dtype=torch.float64)
    forbidden = scores.clone()
    forbidden[3, 2] = -math.inf
    forbidden[0, 0] = -math.inf  # in the first row too, whose maximum is the shift
    plan = sinkhorn(forbidden, 0.05, 3)
    assert plan[3, 2] == 0 and plan[0, 0] == 0
    np.testing.assert_allclose(plan.sum(1).numpy(), 1.0, atol=1e-12)
    # the same as a score so low that its kernel entry is exactly 0
    very_low = scores.clone()
    very_low[3, 2] = very_low[0, 0] = -1e4
    np.testing.assert_allclose(plan.numpy(), sinkhorn(very_low, 0.05, 3).numpy(), atol=1e-12, rtol=0)
    np.testing.assert_allclose(sinkhorn_log(forbidden, 0.05, 3).numpy(), plan.numpy(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("log_domain", [False, True])
def test_low_precision_inputs_are_computed_in_float32(dtype, log_domain):
    scores = cosine_scores(32, 8, seed=5, dtype=dtype)
    plan = sinkhorn(scores, 0.05, 3, log_domain=log_domain)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    expected = sinkhorn(scores.float(), 0.05, 3, log_domain=log_domain)
    assert torch.equal(plan, expected)


def test_ot_cost_is_the_mass_one_weighted_cost():
    scores = cosine_scores(10, 5, seed=2)
    plan = sinkhorn(scores, 0.1, None, tol=1e-12)
    cost = 1.0 - scores
    expected = float(((plan / plan.sum()) * cost).sum())
    assert math.isclose(float(ot_cost(plan, cost)), expected, rel_tol=1e-12)
    p_pot = pot_plan(scores, 0.1) / 10  # mass 1
    assert math.isclose(float(ot_cost(plan, cost)), float((p_pot * cost.numpy()).sum()), rel_tol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        ot_cost(plan, cost[:, :3])


@pytest.mark.parametrize("scores,kwargs,match", [
    (torch.zeros(4), {}, "scores must have shape"),
    (torch.zeros(0, 4), {}, "B = 0"),
    (torch.zeros(4, 0), {}, "K = 0"),
    (torch.tensor([[0.0, float("nan")]]), {}, "NaN or \\+inf"),
    (torch.tensor([[0.0, float("inf")]]), {}, "NaN or \\+inf"),
    (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), {}, "1 NaN or \\+inf"),
    (torch.zeros(4, 3), {"eps": 0.0}, "eps"),
    (torch.zeros(4, 3), {"eps": -1.0}, "eps"),
    (torch.zeros(4, 3), {"n_iters": 0}, "n_iters"),
    (torch.zeros(4, 3, dtype=torch.int64), {}, "floating-point"),
    (torch.zeros(4, 3), {"n_iters": None}, "n_iters"),
])
def test_bad_input_names_the_argument(scores, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sinkhorn(scores, **kwargs)


@pytest.mark.parametrize("where", ["row", "column"])
def test_all_minus_inf_row_or_column_raises_the_same_error_in_both_domains(where):
    """issue case 8: an all -inf row or column gives both solvers the same one-line error, never a NaN plan."""
    scores = cosine_scores(6, 4, seed=3)
    if where == "row":
        scores[2] = -math.inf
    else:
        scores[:, 1] = -math.inf
    messages = []
    for log_domain in (False, True):
        for n_iters in (1, 3):
            with pytest.raises(FloatingPointError, match=f"1 {where}\\(s\\) whose every score is -inf") as caught:
                sinkhorn(scores, 0.05, n_iters, log_domain=log_domain)
            messages.append(str(caught.value))
    assert len(set(messages)) == 1 and "\n" not in messages[0]
    expected_index = "row 2" if where == "row" else "column 1"
    assert expected_index in messages[0]
