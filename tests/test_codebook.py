"""The codebook module, L_code, L_ot and the usage diagnostics (docs/METHOD.md items 2-5)."""
import math

import pytest
import torch
import torch.nn.functional as F

from codis_lib.codebook import Codebook, codebook_losses, codebook_usage, hard_code_perplexity, random_occupancy
from codis_lib.objectives.code_loss import code_probabilities, loss_code
from codis_lib.objectives.ot_loss import loss_ot
from codis_lib.objectives.transport_plans import transport_assignments
from codis_lib.ot import sinkhorn_reference


def unit(batch, dim, seed):
    return F.normalize(torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_rows_are_renormalised_each_step():
    codebook = Codebook(num_codes=10, dim=6)
    with torch.no_grad():
        codebook.weight.mul_(torch.linspace(0.5, 3.0, 10)[:, None])
    assert not torch.allclose(codebook.weight.norm(dim=1), torch.ones(10))
    codebook.normalize_()
    torch.testing.assert_close(codebook.weight.norm(dim=1), torch.ones(10))


def test_code_prediction_is_a_temperature_scaled_softmax():
    codebook = Codebook(num_codes=5, dim=4, temperature=0.1)
    feat = unit(3, 4, 0)
    expected = feat @ codebook.weight.t() / 0.1
    torch.testing.assert_close(codebook.logits(feat), expected)
    probabilities = code_probabilities(feat, codebook.weight, 0.1)  # p = softmax(z C^T / tau_c)
    torch.testing.assert_close(probabilities, F.softmax(expected, dim=1))
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))


def test_transport_assignments_are_sinkhorn_on_cosine_scores():
    codebook = Codebook(num_codes=6, dim=8)
    teacher = unit(20, 8, 1)
    plan = transport_assignments(teacher, codebook.weight, eps=0.05, n_iters=3)
    reference = sinkhorn_reference((teacher @ codebook.weight.t()).detach(), 0.05, 3)
    torch.testing.assert_close(plan.double(), reference, atol=1e-5, rtol=0)
    assert not plan.requires_grad


def test_loss_ot_moves_the_codebook_only():
    codebook = Codebook(num_codes=6, dim=8)
    teacher = unit(20, 8, 2).requires_grad_(True)
    plan = transport_assignments(teacher, codebook.weight)
    loss = loss_ot(teacher, codebook.weight, plan)
    loss.backward()
    assert teacher.grad is None, "teacher features must not receive gradient from L_ot"
    assert codebook.weight.grad is not None and codebook.weight.grad.abs().sum() > 0
    # The value is the mass-1 transport cost of 1 - cosine similarity.
    cost = 1 - teacher.detach() @ codebook.weight.detach().t()
    assert math.isclose(loss.item(), float((plan / plan.sum() * cost).sum()), rel_tol=1e-6)


def test_loss_code_is_cross_modal_swapped_prediction():
    torch.manual_seed(0)
    codebook = Codebook(num_codes=7, dim=8)
    image, text = unit(12, 8, 3), unit(12, 8, 4)
    image_plan = torch.softmax(torch.randn(12, 7), 1)
    text_plan = torch.softmax(torch.randn(12, 7), 1)
    total, t2p, i2p = loss_code(image, text, image_plan, text_plan, codebook.weight, 0.1)
    p_text = torch.softmax(text @ codebook.weight.t() / 0.1, 1)
    p_image = torch.softmax(image @ codebook.weight.t() / 0.1, 1)
    # Text student predicts the IMAGE teacher's plan and vice versa (the swap is the point).
    assert math.isclose(t2p.item(), float(-(image_plan * p_text.log()).sum(1).mean()), rel_tol=1e-5)
    assert math.isclose(i2p.item(), float(-(text_plan * p_image.log()).sum(1).mean()), rel_tol=1e-5)
    assert math.isclose(float(total), float(t2p + i2p), rel_tol=1e-6)
    unswapped = -(text_plan * p_text.log()).sum(1).mean()
    assert abs(float(t2p) - float(unswapped)) > 1e-3


def test_identical_teachers_reduce_to_swav_swapped_prediction():
    """With z_v^m = z_t^m, L_code is SwAV's loss for two views (image, text) sharing one code target."""
    torch.manual_seed(1)
    codebook = Codebook(num_codes=9, dim=8, temperature=0.1)
    teacher = unit(16, 8, 5)
    view_image, view_text = unit(16, 8, 6), unit(16, 8, 7)
    losses = codebook_losses(codebook, view_image, view_text, teacher, teacher, eps=0.05, n_iters=3)
    # SwAV (Caron et al. 2020, eq. 1-3): codes q from Sinkhorn on the features, each view predicts the
    # other view's code with softmax(z . c / tau); the loss sums the two swapped cross-entropies.
    scores = (teacher @ codebook.weight.t()).detach()
    q_image = sinkhorn_reference(scores, 0.05, 3).float()
    q_text = sinkhorn_reference(scores, 0.05, 3).float()
    swav = (-(q_image * F.log_softmax(view_text @ codebook.weight.t() / 0.1, 1)).sum(1).mean()
            - (q_text * F.log_softmax(view_image @ codebook.weight.t() / 0.1, 1)).sum(1).mean())
    assert math.isclose(float(losses.code), float(swav), rel_tol=1e-5)


def test_codebook_losses_give_gradients_to_students_and_codebook_not_teachers():
    codebook = Codebook(num_codes=5, dim=8)
    image, text = unit(10, 8, 8).requires_grad_(), unit(10, 8, 9).requires_grad_()
    image_m, text_m = unit(10, 8, 10).requires_grad_(), unit(10, 8, 11).requires_grad_()
    losses = codebook_losses(codebook, image, text, image_m, text_m)
    (losses.code + losses.ot).backward()
    assert image.grad is not None and text.grad is not None and codebook.weight.grad is not None
    assert image_m.grad is None and text_m.grad is None
    assert math.isclose(float(losses.ot), float(losses.ot_image + losses.ot_text), rel_tol=1e-6)


def test_usage_diagnostics():
    uniform = torch.eye(8)  # every code wins one sample
    usage = codebook_usage(uniform)
    assert math.isclose(usage["perplexity"], 8.0, rel_tol=1e-5) and usage["dead_codes"] == 0
    collapsed = torch.zeros(8, 8)
    collapsed[:, 3] = 1  # argmax-style collapse onto one code
    usage = codebook_usage(collapsed)
    assert math.isclose(usage["perplexity"], 1.0, rel_tol=1e-5) and usage["dead_codes"] == 7
    assert usage["active_codes"] == 1
    assert usage["hard_perplexity"] == 1.0 and codebook_usage(uniform)["hard_perplexity"] > 8.0 - 1e-9
    # nearly uniform rows: the mean assignment looks perfectly spread while every arg-max is code 0
    flat = torch.full((8, 8), 1.0 / 8) + 1e-3 * torch.eye(8)[0]
    usage = codebook_usage(flat)
    assert usage["perplexity"] > 7.99 and usage["hard_perplexity"] == 1.0 and usage["dead_codes"] == 7


def test_random_occupancy_matches_exact_values():
    # one throw: perplexity 1 in every draw; K throws into K codes leave K (1 - 1/K)^K empty on average
    assert random_occupancy(1, 16)["perplexity"] == 1.0 and random_occupancy(1, 16)["dead_codes"] == 15.0
    many = random_occupancy(64, 64, draws=2000)
    assert math.isclose(many["dead_codes"], 64 * (63 / 64) ** 64)
    # perplexity <= occupied codes on average, and >= 1 / E[sum f^2] (Jensen), up to 4 standard errors
    low, high = 1 / ((1 - 1 / 64) / 64 + 1 / 64), 64 - many["dead_codes"]
    slack = 4 * many["perplexity_sd"] / 2000 ** 0.5
    assert low - slack <= many["perplexity"] <= high + slack
    assert hard_code_perplexity(torch.tensor([0, 1, 2, 3]), 8) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="random_occupancy"):
        random_occupancy(0, 8)


@pytest.mark.parametrize("call,match", [
    (lambda cb: loss_ot(unit(4, 3, 0), cb.weight, torch.ones(4, 5) / 5), "width"),
    (lambda cb: loss_code(unit(4, 8, 0), unit(4, 8, 1), torch.ones(4, 4), torch.ones(4, 5), cb.weight), "image_plan"),
    (lambda cb: loss_code(unit(4, 8, 0), unit(3, 8, 1), torch.ones(4, 5), torch.ones(4, 5), cb.weight), "text_feat"),
    (lambda cb: transport_assignments(torch.zeros(0, 8), cb.weight), "B = 0"),
    (lambda cb: Codebook(0, 8), "num_codes"),
    (lambda cb: codebook_usage(torch.zeros(0, 5)), "assignments"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(Codebook(num_codes=5, dim=8))
