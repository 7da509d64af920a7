"""The loss functions of codis_lib.objectives on hand-made tensors, and the typed diagnostics of a forward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from codis_lib.config import ModelConfig
from codis_lib.objectives.alignment import clip_alignment, distilled_alignment, positive_targets, soft_cross_entropy
from codis_lib.objectives.itm import (hard_negative_weights, image_text_matching, itm_loss_from_logits, itm_pairs,
                                      sample_hard_negatives)
from codis_lib.objectives.mlm import masked_language_modelling, mlm_loss_from_logits
from codis_lib.model import build_model
from codis_lib.model.output import Diagnostics
from codis_lib.train.engine import LOGGED_DIAGNOSTICS


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_positive_targets_paired_column_or_shared_ids_with_and_without_the_queue():
    one_hot = positive_targets(2, 4, 2, queue_ids=torch.full((3,), -100))  # rank 1 of 2, queue of 3
    expected = torch.zeros(2, 7)
    expected[0, 2] = expected[1, 3] = 1.0
    assert torch.equal(one_hot, expected)
    assert positive_targets(2, 4, 2).shape == (2, 4)
    ids_all = torch.tensor([5, 6, 5, 7])
    shared = positive_targets(2, 4, 2, image_ids=ids_all[2:], ids_all=ids_all, queue_ids=torch.tensor([5, -100, 7]))
    assert torch.allclose(shared[0], torch.tensor([1, 0, 1, 0, 1, 0, 0]) / 3.0)
    assert torch.allclose(shared[1], torch.tensor([0, 0, 0, 1, 0, 0, 1]) / 2.0)
    with pytest.raises(ValueError, match="ids_all"):
        positive_targets(2, 4, 2, image_ids=ids_all[2:])


def test_clip_alignment_is_the_symmetric_in_batch_cross_entropy():
    image_feat, text_feat, temp = _unit(5, 8), _unit(5, 8, seed=1), torch.tensor(0.1)
    align = clip_alignment(image_feat, text_feat, temp, offset=0)
    logits = image_feat @ text_feat.t() / temp
    labels = torch.arange(5)
    by_hand = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(align.itc, by_hand)
    assert align.unimodal is None and align.total is align.itc and set(align.sims) == {"i2t", "t2i"}


def test_distilled_alignment_mixes_teacher_softmax_and_positives():
    image_feat, text_feat = _unit(3, 8), _unit(3, 8, seed=1)
    image_m, text_m = _unit(3, 8, seed=2), _unit(3, 8, seed=3)
    queue_image, queue_text = _unit(8, 4, seed=4), _unit(8, 4, seed=5)  # (d, Q), unit columns after transposing
    image_columns, text_columns = torch.cat([image_m.t(), queue_image], 1), torch.cat([text_m.t(), queue_text], 1)
    positives = positive_targets(3, 3, 0, queue_ids=torch.full((4,), -100))
    temp, alpha = torch.tensor(0.07), 0.3
    align = distilled_alignment(image_feat, text_feat, image_m, text_m, image_columns, text_columns, positives, alpha,
                                temp, unimodal=True)
    targets = alpha * F.softmax(image_m @ image_columns / temp, dim=1) + (1 - alpha) * positives
    by_hand = -(targets * F.log_softmax(image_feat @ image_columns / temp, dim=1)).sum(1).mean()
    torch.testing.assert_close(align.terms["i2i"], by_hand)
    torch.testing.assert_close(align.total, (align.terms["i2t"] + align.terms["t2i"]) / 2
                               + (align.terms["i2i"] + align.terms["t2t"]) / 2)
    cross_only = distilled_alignment(image_feat, text_feat, image_m, text_m, image_columns, text_columns, positives,
                                     0.0, temp, unimodal=False)
    assert cross_only.unimodal is None and set(cross_only.terms) == {"i2t", "t2i"}
    torch.testing.assert_close(cross_only.terms["t2i"], soft_cross_entropy(text_feat @ image_columns / temp, positives))


def test_itm_pairs_and_loss_from_a_scoring_callable():
    batch = 3
    image_embeds = torch.arange(batch, dtype=torch.float).reshape(batch, 1, 1).expand(batch, 2, 4).clone()
    text_embeds = (10 + torch.arange(batch, dtype=torch.float)).reshape(batch, 1, 1).expand(batch, 5, 4).clone()
    mask = torch.ones(batch, 5, dtype=torch.long)
    pairs = itm_pairs(image_embeds, text_embeds, mask, torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    assert pairs.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert pairs.image_embeds[:, 0, 0].tolist() == [0, 1, 2, 1, 2, 0, 0, 1, 2]
    assert pairs.text_embeds[:, 0, 0].tolist() == [10, 11, 12, 10, 11, 12, 12, 10, 11]

    def oracle(image_rows, text_rows, _mask):  # "match" exactly when text id - 10 equals image id
        match = (text_rows[:, 0, 0] - 10 == image_rows[:, 0, 0]).float()
        return torch.stack([1 - match, match], dim=1) * 20.0

    sim = torch.randn(batch, batch)
    result = image_text_matching(oracle, image_embeds, text_embeds, mask, sim, sim.t(), offset=0,
                                 sample_seeds=torch.arange(batch))
    assert result.accuracy.item() == 1.0 and result.loss.item() < 1e-6
    chance = itm_loss_from_logits(torch.zeros(4, 2), torch.tensor([1, 0, 0, 0]))
    assert math.isclose(chance.loss.item(), math.log(2), rel_tol=1e-6)


def test_hard_negative_weights_are_the_softmax_without_the_forbidden_columns():
    gen = torch.Generator().manual_seed(3)
    sim_i2t, sim_t2i = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    ids_all = torch.tensor([0, 0, 1, 1, 2, 3])
    offset = 3  # rank 1 of 2: rows are columns 3, 4, 5
    weights_t2i, weights_i2t = hard_negative_weights(sim_i2t, sim_t2i, offset, ids_all[offset:], ids_all)
    for sim, weights in ((sim_t2i, weights_t2i), (sim_i2t, weights_i2t)):
        forbidden = ids_all[offset:, None] == ids_all[None, :]  # the positive and column 2 (same id as row 0)
        expected = F.softmax(sim, dim=1).masked_fill(forbidden, 0.0)
        torch.testing.assert_close(weights, expected / expected.sum(dim=1, keepdim=True))
        assert (weights[forbidden] == 0).all() and torch.allclose(weights.sum(dim=1), torch.ones(3))
    without_ids = hard_negative_weights(sim_i2t, sim_t2i, offset)[1]
    assert without_ids[0, 2] > 0 and (without_ids[torch.arange(3), offset + torch.arange(3)] == 0).all()


def test_hard_negatives_from_a_generator_are_torch_multinomial_on_the_weights():
    gen = torch.Generator().manual_seed(4)
    sim_i2t, sim_t2i = torch.randn(5, 5, generator=gen), torch.randn(5, 5, generator=gen)
    weights_t2i, weights_i2t = hard_negative_weights(sim_i2t, sim_t2i)
    draws = torch.Generator().manual_seed(9)
    expected = (torch.multinomial(weights_t2i, 1, generator=draws).squeeze(1),
                torch.multinomial(weights_i2t, 1, generator=draws).squeeze(1))  # images first, then texts
    drawn = sample_hard_negatives(sim_i2t, sim_t2i, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    torch.manual_seed(9)  # without a generator: the global one, as before
    assert all(torch.equal(a, b) for a, b in zip(sample_hard_negatives(sim_i2t, sim_t2i), expected))

    def scorer(image_rows, text_rows, _mask):  # two "logits" read off the pair's first features
        return torch.cat([image_rows[:, 0, :1], text_rows[:, 0, :1]], dim=1)

    embeds, mask = torch.randn(5, 2, 3, generator=gen), torch.ones(5, 4, dtype=torch.long)
    texts = torch.randn(5, 4, 3, generator=gen)
    runs = [image_text_matching(scorer, embeds, texts, mask, sim_i2t, sim_t2i, offset=0,
                                generator=torch.Generator().manual_seed(9)).loss for _ in range(2)]
    pairs = itm_pairs(embeds, texts, mask, *expected)
    by_hand = itm_loss_from_logits(scorer(pairs.image_embeds, pairs.text_embeds, pairs.attention_mask), pairs.labels)
    assert runs[0].item() == runs[1].item() == by_hand.loss.item()


def test_mlm_loss_is_ce_without_a_teacher_and_the_alpha_mix_with_one():
    gen = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 11, generator=gen), torch.randn(6, 11, generator=gen)
    targets, count = torch.randint(11, (6,), generator=gen), torch.tensor(6.0)
    plain = mlm_loss_from_logits(logits, targets, count, alpha=0.4)
    torch.testing.assert_close(plain.loss, F.cross_entropy(logits, targets))
    assert plain.distill.item() == 0.0
    halved = mlm_loss_from_logits(logits, targets, torch.tensor(12.0), alpha=0.0, teacher_logits=teacher)
    torch.testing.assert_close(halved.loss, plain.loss / 2)  # the global-batch count divides the token sum
    mixed = mlm_loss_from_logits(logits, targets, count, alpha=0.4, teacher_logits=teacher)
    distill = -(F.softmax(teacher, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(mixed.distill, distill)
    torch.testing.assert_close(mixed.loss, 0.6 * plain.loss + 0.4 * distill)


def test_masked_language_modelling_reads_only_the_masked_positions():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=gen, requires_grad=True)  # (B, L, D)
    head = torch.nn.Linear(4, 7)  # the MLM head: D -> V
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 2, 6, 0
    teacher = torch.randn(2, 5, 7, generator=gen)
    calls = []

    def teacher_logits(positions):
        calls.append(positions)
        return teacher[positions]

    positions = labels != -100
    loss = masked_language_modelling(hidden, labels, head, alpha=0.4, teacher_logits=teacher_logits)
    expected = mlm_loss_from_logits(head(hidden[positions]), labels[positions], torch.tensor(3.0), alpha=0.4,
                                    teacher_logits=teacher[positions])
    for got, want in zip(loss, expected):
        torch.testing.assert_close(got, want)
    assert len(calls) == 1 and torch.equal(calls[0], positions)
    masked_language_modelling(hidden, labels, head, alpha=0.0, teacher_logits=teacher_logits)
    assert len(calls) == 1  # alpha = 0: the teacher is not run
    nothing = masked_language_modelling(hidden, torch.full((2, 5), -100), head, alpha=0.4)
    nothing.loss.backward()  # a batch without masked tokens still reaches the graph, with zero gradient
    assert nothing.loss.item() == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_diagnostics_are_typed_and_details_come_only_when_asked_for():
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny")
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 64, 64, generator=gen)
    input_ids = torch.randint(10, config.text.vocab_size, (2, 8), generator=gen)
    input_ids[:, 0] = config.text.cls_token_id
    mask = torch.ones_like(input_ids)
    model = build_model(config).eval()
    with torch.no_grad():
        plain = model(image, input_ids, mask, alpha=0.4, sample_seeds=torch.tensor([1, 2]))
        detailed = model(image, input_ids, mask, alpha=0.4, sample_seeds=torch.tensor([1, 2]), return_details=True)
    assert plain.details is None and torch.equal(plain.loss, detailed.loss)
    assert detailed.details.sim_t2t.shape == (2, 2 + config.queue_size)
    scalars = plain.diagnostics.scalars()
    assert set(LOGGED_DIAGNOSTICS) <= set(scalars) and all(isinstance(v, float) for v in scalars.values())
    assert scalars["align_i2t"] == plain.diagnostics.align_i2t.item()
    with pytest.raises(ValueError, match="unknown diagnostics"):
        plain.diagnostics.scalar_tensors(["align_itm"])
    clip = build_model(config.with_overrides(mode="clip")).eval()
    with torch.no_grad():
        clip_diagnostics = clip(image, input_ids, mask, alpha=0.4).diagnostics
    assert clip_diagnostics.itm_accuracy is None and clip_diagnostics.align_i2i is None
    assert set(clip_diagnostics.scalars()) == {"temperature", "align_itc", "align_i2t", "align_t2i"}
    assert set(LOGGED_DIAGNOSTICS) <= set(Diagnostics.names())


def test_student_columns_score_the_batch_with_gradient_and_keep_the_teacher_targets():
    batch, queue, dim = 4, 3, 8
    image, text = _unit(batch, dim, seed=1).requires_grad_(), _unit(batch, dim, seed=2).requires_grad_()
    image_m, text_m = _unit(batch, dim, seed=3), _unit(batch, dim, seed=4)
    image_columns = torch.cat([image_m.t(), _unit(queue, dim, seed=5).t()], dim=1)  # (d, B + Q)
    text_columns = torch.cat([text_m.t(), _unit(queue, dim, seed=6).t()], dim=1)
    positives = positive_targets(batch, batch, 0, queue_ids=torch.full((queue,), -100))
    temp = torch.tensor(0.1)
    args = (image, text, image_m, text_m, image_columns, text_columns, positives, 0.4, temp)
    teacher = distilled_alignment(*args, unimodal=True)
    student = distilled_alignment(*args, unimodal=True, student_columns=True)
    # i2t scores the student's own texts in the batch and the teacher's queue; the targets are unchanged.
    expected_sim = image @ torch.cat([text.t(), text_columns[:, batch:]], dim=1) / temp
    assert torch.allclose(student.sims["i2t"], expected_sim)
    targets = 0.4 * F.softmax(image_m @ text_columns / temp, dim=1) + 0.6 * positives
    assert torch.allclose(student.terms["i2t"], soft_cross_entropy(expected_sim, targets))
    # i2i keeps the teacher columns, so it is the same loss either way.
    assert torch.equal(student.terms["i2i"], teacher.terms["i2i"])
    # The gradient now reaches the text features through the i2t columns (it cannot with teacher columns).
    (grad_text,) = torch.autograd.grad(student.terms["i2t"], text)
    assert grad_text.abs().sum() > 0
    with pytest.raises(RuntimeError):  # teacher columns: i2t does not depend on the student's texts
        torch.autograd.grad(teacher.terms["i2t"], text)


def test_align_columns_is_validated():
    with pytest.raises(ValueError, match="align_columns"):
        ModelConfig.from_dict({"preset": "tiny", "align_columns": "both"}).validate()
