"""The CODIS model: EMA teacher, FIFO queues, gradients, hard negatives, loss composition, every mode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codis_lib.config import ModelConfig
from codis_lib.objectives.code_loss import code_probabilities
from codis_lib.objectives.itm import sample_hard_negatives
from codis_lib.model import CODIS, build_model
from codis_lib.model.masking import mask_tokens

TINY = ModelConfig.preset("tiny")


def _batch(config: ModelConfig, batch: int = 4, length: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    image = torch.randn(batch, 3, size, size, generator=gen)
    input_ids = torch.randint(10, config.text.vocab_size, (batch, length), generator=gen)
    input_ids[:, 0] = config.text.cls_token_id
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, length - 3:] = 0  # one padded caption
    input_ids[attention_mask == 0] = config.text.pad_token_id
    return image, input_ids, attention_mask


def _model(mode: str = "codis", seed: int = 0, **overrides) -> CODIS:
    torch.manual_seed(seed)
    return build_model(TINY.with_overrides({"mode": mode, **overrides}))


@torch.no_grad()
def _perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.add_(scale * torch.randn(param.shape, generator=gen))


def test_ema_update_is_exactly_m_teacher_plus_one_minus_m_student():
    model = _model()
    _perturb(model.visual_encoder)
    _perturb(model.text_encoder, seed=2)
    _perturb(model.text_proj_m, seed=3)  # teacher != student everywhere that matters
    pairs = [(s, t) for student, teacher in model.teacher_pairs()
             for s, t in zip(student.parameters(), teacher.parameters())]
    before = [(s.detach().clone().double(), t.detach().clone().double()) for s, t in pairs]
    m = model.config.momentum
    model.train()
    model(*_batch(model.config), alpha=0.4)  # the forward applies the update first
    for (student, teacher), (s0, t0) in zip(pairs, before):
        expected = m * t0 + (1 - m) * s0
        torch.testing.assert_close(teacher.detach().double(), expected, atol=1e-7, rtol=1e-6)
    moved = max((t.detach().double() - t0).abs().max().item() for (_, t), (_, t0) in zip(pairs, before))
    assert moved > 1e-5  # the teacher did follow the (perturbed) student
    # In eval mode the forward leaves the teacher alone.
    model.eval()
    frozen = [t.detach().clone() for _, t in pairs]
    with torch.no_grad():
        model(*_batch(model.config), alpha=0.4)
    assert all(torch.equal(t, f) for (_, t), f in zip(pairs, frozen))


def test_ema_update_skips_parameters_that_do_not_train_and_averages_the_rest():
    model = _model()
    frozen_student = model.visual_encoder.patch_embed.proj.weight  # stands in for a frozen ImageNet trunk
    frozen_student.requires_grad_(False)
    _perturb(model.visual_encoder)
    pairs = [(s, t) for student, teacher in model.teacher_pairs()
             for s, t in zip(student.parameters(), teacher.parameters())]
    before = [(s.detach().clone(), t.detach().clone()) for s, t in pairs]
    model.momentum_update()
    m = model.config.momentum
    skipped = 0
    for (student, teacher), (s0, t0) in zip(pairs, before):
        if student is frozen_student:
            assert torch.equal(teacher, t0)  # left as it was, although the student differs from it
            assert not torch.equal(s0, t0)
            skipped += 1
        else:
            torch.testing.assert_close(teacher.detach(), m * t0 + (1 - m) * s0, atol=1e-7, rtol=1e-6)
    assert skipped == 1


def test_assign_codes_are_the_code_probabilities_of_the_renormalised_codes():
    model = _model()
    with torch.no_grad():
        model.codebook.weight.mul_(2.0)  # off the unit sphere, as after an optimizer step
    feat = F.normalize(torch.randn(5, model.config.embed_dim, generator=torch.Generator().manual_seed(3)), dim=1)
    expected = code_probabilities(feat, F.normalize(model.codebook.weight, dim=1), model.codebook.temperature)
    assert torch.equal(model.assign_codes(feat), expected)
    assert not torch.allclose(expected, code_probabilities(feat, model.codebook.weight, model.codebook.temperature))


def test_queue_pointer_wraps_fifo():
    model = _model(queue_size=12)
    dim = model.config.embed_dim
    feats = [F.normalize(torch.randn(5, dim), dim=1) for _ in range(3)]
    for step, feat in enumerate(feats):
        model.dequeue_and_enqueue(feat, -feat, torch.full((5,), step))
    assert int(model.queue_ptr) == 15 % 12
    # Slots 0-4: batch 0 overwritten by batch 2's tail; 5-9: batch 1; 10-11: batch 2's head.
    torch.testing.assert_close(model.image_queue[:, 5:10].t(), feats[1])
    torch.testing.assert_close(model.image_queue[:, 10:12].t(), feats[2][:2])
    torch.testing.assert_close(model.image_queue[:, 0:3].t(), feats[2][2:])
    torch.testing.assert_close(model.image_queue[:, 3:5].t(), feats[0][3:])
    torch.testing.assert_close(model.text_queue[:, 5:10].t(), -feats[1])
    assert model.idx_queue[0].tolist() == [2, 2, 2, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    # More features than slots: the newest Q survive, and the pointer moves on by the count.
    many = F.normalize(torch.randn(20, dim), dim=1)
    model.dequeue_and_enqueue(many, many)
    assert int(model.queue_ptr) == (3 + 20) % 12
    assert {tuple(c.tolist()) for c in model.image_queue.t().round(decimals=5)} == \
        {tuple(r.tolist()) for r in many[-12:].round(decimals=5)}


def _assert_queues_start_with_teacher_features(model: CODIS, image: torch.Tensor, input_ids: torch.Tensor,
                                               attention_mask: torch.Tensor) -> None:
    """Assert that the first len(image) columns of both queues are the teacher's features of these inputs."""
    with torch.no_grad():
        _, image_feat_m = model.encode_image_teacher(image)
        _, text_feat_m = model.encode_text_teacher(input_ids, attention_mask)
    torch.testing.assert_close(model.image_queue[:, :len(image)].t(), image_feat_m)
    torch.testing.assert_close(model.text_queue[:, :len(image)].t(), text_feat_m)


def test_training_forward_enqueues_the_teacher_features():
    model = _model(queue_size=8).train()
    image, input_ids, attention_mask = _batch(model.config)
    model(image, input_ids, attention_mask, alpha=0.4)
    assert int(model.queue_ptr) == 4
    _assert_queues_start_with_teacher_features(model, image, input_ids, attention_mask)


def test_teacher_never_receives_gradients_and_the_student_does():
    model = _model().train()
    output = model(*_batch(model.config), alpha=0.4)
    output.loss.backward()
    for _, teacher in model.teacher_pairs():
        for name, param in teacher.named_parameters():
            assert not param.requires_grad and param.grad is None, name
    for module in (model.visual_encoder, model.text_encoder, model.vision_proj, model.text_proj, model.itm_head,
                   model.codebook):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    assert model.temp.grad is not None and model.temp.grad.abs() > 0


@pytest.mark.parametrize("peaked", [False, True])
def test_hard_negatives_are_never_the_positive_nor_the_same_image(peaked):
    gen = torch.Generator().manual_seed(0)
    batch, global_batch, offset = 6, 12, 6  # rank 1 of 2
    image_ids_all = torch.tensor([0, 0, 1, 2, 3, 3, 4, 4, 5, 6, 7, 7])
    image_ids = image_ids_all[offset:offset + batch]
    for trial in range(50):
        sim_i2t = torch.randn(batch, global_batch, generator=gen) * 5
        sim_t2i = torch.randn(batch, global_batch, generator=gen) * 5
        if peaked:  # positives far ahead: ALBEF's zeroed softmax would underflow to all-zero rows
            sim_i2t[torch.arange(batch), offset + torch.arange(batch)] = 1e4
            sim_t2i[torch.arange(batch), offset + torch.arange(batch)] = 1e4
        neg_image, neg_text = sample_hard_negatives(sim_i2t, sim_t2i, offset)
        positives = offset + torch.arange(batch)
        assert (neg_image != positives).all() and (neg_text != positives).all()
        neg_image, neg_text = sample_hard_negatives(sim_i2t, sim_t2i, offset, image_ids, image_ids_all,
                                                    sample_seeds=torch.arange(batch) + 10 * trial)
        assert (image_ids_all[neg_image] != image_ids).all() and (image_ids_all[neg_text] != image_ids).all()
    with pytest.raises(ValueError, match="no negative"):
        same = torch.zeros(2, dtype=torch.long)
        sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), 0, same, same)


def test_seeded_hard_negatives_follow_the_weights_and_ignore_the_split():
    gen = torch.Generator().manual_seed(1)
    sim = torch.randn(8, 8, generator=gen)
    seeds = torch.arange(8) + 500
    full = sample_hard_negatives(sim, sim.t().contiguous(), 0, sample_seeds=seeds)
    top = sample_hard_negatives(sim[:4], sim.t()[:4].contiguous(), 0, sample_seeds=seeds[:4])
    assert torch.equal(full[0][:4], top[0]) and torch.equal(full[1][:4], top[1])
    # Over many seeds the draw frequencies match softmax with the positive removed.
    row = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    draws = torch.stack([sample_hard_negatives(row, row, 0, sample_seeds=torch.tensor([s]))[1]
                         for s in range(4000)]).flatten()
    expected = F.softmax(torch.tensor([0.0, 1.0, -1.0]), dim=0)
    observed = torch.bincount(draws, minlength=4)[1:].float() / len(draws)
    assert (draws != 0).all() and torch.allclose(observed, expected, atol=0.03)


def test_albef_configuration_equals_itc_plus_itm_plus_mlm_by_hand():
    # codis mode with the unimodal pair and the codebook switched off must be ALBEF's objective.
    model = _model("codis", **{"losses.align_unimodal": False, "losses.code": False, "losses.ot": False}).eval()
    _perturb(model.visual_encoder_m, seed=4)  # a teacher that differs, so distillation matters
    _perturb(model.text_encoder_m, seed=5)
    image, input_ids, attention_mask = _batch(model.config, batch=2, length=12, seed=7)
    seeds = torch.tensor([11, 12])
    alpha = 0.4
    with torch.no_grad():
        output = model(image, input_ids, attention_mask, alpha=alpha, sample_seeds=seeds)
    assert set(output.losses) == {"align", "itm", "mlm"}

    with torch.no_grad():
        vit, vit_m = model.visual_encoder, model.visual_encoder_m
        image_embeds, image_embeds_m = vit.forward_features(image), vit_m.forward_features(image)
        z_v = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
        z_v_m = F.normalize(model.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
        text_embeds = model.text_encoder.bert.forward_text(input_ids, attention_mask)
        z_t = F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1)
        z_t_m = F.normalize(model.text_proj_m(model.text_encoder_m.bert.forward_text(input_ids, attention_mask)[:, 0]),
                            dim=-1)
        temp = model.temp
        text_all = torch.cat([z_t_m.t(), model.text_queue], dim=1)  # (d, B + Q)
        image_all = torch.cat([z_v_m.t(), model.image_queue], dim=1)
        onehot = torch.zeros(2, text_all.shape[1])
        onehot[0, 0] = onehot[1, 1] = 1
        def ita(student, teacher, columns):
            targets = alpha * F.softmax(teacher @ columns / temp, dim=1) + (1 - alpha) * onehot
            return -(F.log_softmax(student @ columns / temp, dim=1) * targets).sum(1).mean()
        loss_ita = (ita(z_v, z_v_m, text_all) + ita(z_t, z_t_m, image_all)) / 2

        # With two samples the only hard negative of each is the other one.
        def itm(image_rows, text_rows, mask_rows):
            fused = model.text_encoder.bert.forward_fusion(text_rows, mask_rows, image_rows)
            return model.itm_head(fused[:, 0])
        swap = torch.tensor([1, 0])
        logits = torch.cat([itm(image_embeds, text_embeds, attention_mask),
                            itm(image_embeds[swap], text_embeds, attention_mask),  # negative image per text
                            itm(image_embeds, text_embeds[swap], attention_mask[swap])])  # negative text per image
        loss_itm = F.cross_entropy(logits, torch.tensor([1, 1, 0, 0, 0, 0]))

        text = model.config.text
        masked, labels = mask_tokens(input_ids, vocab_size=text.vocab_size, mask_token_id=text.mask_token_id,
                                     pad_token_id=text.pad_token_id, cls_token_id=text.cls_token_id,
                                     sample_seeds=seeds, draw_length=text.max_position_embeddings)
        assert (labels != -100).sum() > 0
        logits_mlm = model.text_encoder.mlm_logits(masked, attention_mask, image_embeds)  # (B, L, V)
        logits_m = model.text_encoder_m.mlm_logits(masked, attention_mask, image_embeds_m)
        ce = F.cross_entropy(logits_mlm.flatten(0, 1), labels.flatten(), ignore_index=-100)
        chosen = labels != -100
        distill = -(F.softmax(logits_m[chosen], -1) * F.log_softmax(logits_mlm[chosen], -1)).sum(-1).mean()
        loss_mlm = (1 - alpha) * ce + alpha * distill

    torch.testing.assert_close(output.losses["align"], loss_ita, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.losses["itm"], loss_itm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.losses["mlm"], loss_mlm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.loss, loss_ita + loss_itm + loss_mlm, atol=1e-5, rtol=1e-5)
    # The albef mode of the same weights gives the same numbers.
    albef = _model("albef")
    albef.load_state_dict(model.state_dict())
    with torch.no_grad():
        same = albef.eval()(image, input_ids, attention_mask, alpha=alpha, sample_seeds=seeds)
    torch.testing.assert_close(same.loss, output.loss)


def test_codis_alignment_adds_the_unimodal_pair_and_weights_apply():
    model = _model(**{"losses.itm_weight": 0.5, "losses.align_unimodal_weight": 2.0}).eval()
    with torch.no_grad():
        output = model(*_batch(model.config), alpha=0.4, return_details=True)
    diag, details = output.diagnostics, output.details
    torch.testing.assert_close(output.losses["align"], (diag.align_i2t + diag.align_t2i) / 2
                               + (diag.align_i2i + diag.align_t2t) / 2)
    assert details.sim_i2i.shape == (4, 4 + model.config.queue_size)
    expected = (diag.align_itc + 2.0 * diag.align_unimodal + output.losses["code"] + output.losses["ot"]
                + 0.5 * output.losses["itm"] + output.losses["mlm"])
    torch.testing.assert_close(output.loss, expected)
    assert details.assign_image.shape == (4, model.config.codebook_size)
    torch.testing.assert_close(details.assign_image.sum(1), torch.ones(4))


@pytest.mark.parametrize("mode, terms", [("clip", {"align"}), ("albef", {"align", "itm", "mlm"}),
                                         ("codis", {"align", "code", "ot", "itm", "mlm"})])
def test_every_mode_trains_forward_and_backward(mode, terms):
    model = _model(mode).train()
    teacher_before = model.visual_encoder_m.pos_embed.detach().clone()
    _perturb(model.visual_encoder, seed=9)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    image, input_ids, attention_mask = _batch(model.config)
    output = model(image, input_ids, attention_mask, alpha=0.4, image_ids=torch.tensor([3, 3, 4, 5]),
                   sample_seeds=torch.arange(4))
    assert set(output.losses) == terms
    assert torch.isfinite(output.loss)
    output.loss.backward()
    optimizer.step()
    moved = not torch.equal(model.visual_encoder_m.pos_embed, teacher_before)
    if mode == "clip":  # no teacher and no queue in clip mode
        assert not moved and int(model.queue_ptr) == 0
        assert not model.itm_head.weight.requires_grad and not model.codebook.weight.requires_grad
    else:
        assert moved and int(model.queue_ptr) == 4
        assert model.idx_queue[0, :4].tolist() == [3, 3, 4, 5]


def test_bf16_autocast_keeps_contrastive_math_in_float32():
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(*_batch(model.config), alpha=0.4, return_details=True)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert output.details.sim_i2t.dtype == torch.float32
    assert output.details.assign_image.dtype == torch.float32
    assert model.visual_encoder.patch_embed.proj.weight.grad is not None


@pytest.mark.slow  # builds the 210M-parameter base model
def test_base_builds_and_runs_one_forward_at_batch_2():
    torch.manual_seed(0)
    config = ModelConfig.preset("base")
    model = build_model(config).eval()
    n_student = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 200e6 < n_student < 230e6  # ViT-B/16 (86M) + BERT-base with 6 cross-attention layers (~124M) + heads
    image, input_ids, attention_mask = _batch(config, batch=2, length=8)
    with torch.no_grad():
        output = model(image, input_ids, attention_mask, alpha=0.4, return_details=True)
    assert set(output.losses) == {"align", "code", "ot", "itm", "mlm"}
    assert torch.isfinite(output.loss)
    assert output.details.sim_i2t.shape == (2, 2 + 65536)


def test_bad_batches_are_named():
    model = _model().eval()
    image, input_ids, attention_mask = _batch(model.config)
    with pytest.raises(ValueError, match=r"image must have shape \(B, 3, 64, 64\)"):
        model(image[:, :, :32, :32], input_ids, attention_mask, alpha=0.4)
    too_big = input_ids.clone()
    too_big[0, 1] = model.config.text.vocab_size
    with pytest.raises(ValueError, match="with_tokenizer"):
        model(image, too_big, attention_mask, alpha=0.4)
    with pytest.raises(ValueError, match="alpha must be in"):
        model(image, input_ids, attention_mask, alpha=1.5)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(image, input_ids, attention_mask[:, :3], alpha=0.4)


def _second_view(config: ModelConfig, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Return another image view (mirrored + noise) and other captions of another length, like the teacher's views."""
    gen = torch.Generator().manual_seed(3)
    image_teacher = image.flip(-1) + 0.5 * torch.randn(image.shape, generator=gen)
    teacher_ids = torch.randint(10, config.text.vocab_size, (input_ids.shape[0], input_ids.shape[1] + 3), generator=gen)
    teacher_ids[:, 0] = config.text.cls_token_id
    teacher_mask = torch.ones_like(teacher_ids)
    teacher_mask[1, 6:] = 0
    teacher_ids[teacher_mask == 0] = config.text.pad_token_id
    return image_teacher, teacher_ids, teacher_mask


def _state(model: CODIS, output) -> dict:
    return {"loss": output.loss, **output.losses, "image_queue": model.image_queue, "text_queue": model.text_queue,
            **{name: param for name, param in model.named_parameters()}}


@pytest.mark.parametrize("mode", ["clip", "albef", "codis"])
def test_teacher_views_off_is_the_teacher_reading_the_students_inputs(mode):
    """Without teacher inputs the forward is today's, bit for bit: the same as handing the student's inputs over."""
    image, input_ids, attention_mask = _batch(TINY)
    seeds = torch.arange(4)
    results = []
    for views, keywords in ((("same", "same"), {}),
                            (("own", "other_caption"), {}),  # the switch alone changes nothing in the model
                            (("same", "same"), {"image_teacher": image, "teacher_input_ids": input_ids,
                                                "teacher_attention_mask": attention_mask})):
        model = _model(mode, teacher_view=views[0], teacher_text_view=views[1]).train()
        output = model(image, input_ids, attention_mask, alpha=0.4, sample_seeds=seeds, **keywords)
        output.loss.backward()
        results.append((_state(model, output), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (reference, reference_grads), others = results[0], results[1:]
    for state, grads in others:
        assert state.keys() == reference.keys() and grads.keys() == reference_grads.keys()
        assert all(torch.equal(state[key], reference[key]) for key in reference)
        assert all(torch.equal(grads[key], reference_grads[key]) for key in reference_grads)


def test_the_teacher_encodes_its_own_views_everywhere_it_reads_them():
    model = _model(queue_size=8).eval()
    _perturb(model.text_encoder, scale=0.3, seed=6)  # captions that the initial encoder maps to one point drift apart
    model.copy_student_to_teacher()  # teacher = student: with one view, the i2i and t2t positives are 1 / temp
    image, input_ids, attention_mask = _batch(model.config)
    image_teacher, teacher_ids, teacher_mask = _second_view(model.config, image, input_ids, attention_mask)
    seeds = torch.arange(4) + 20
    views = {"image_teacher": image_teacher, "teacher_input_ids": teacher_ids, "teacher_attention_mask": teacher_mask}
    with torch.no_grad():
        same = model(image, input_ids, attention_mask, alpha=0.4, sample_seeds=seeds, return_details=True)
        own = model(image, input_ids, attention_mask, alpha=0.4, sample_seeds=seeds, return_details=True, **views)
        # The intra-modal positives (the diagonal of i2i, t2t) are no longer won by the same input twice.
        for name in ("sim_i2i", "sim_t2t"):
            positive_same = getattr(same.details, name)[:, :4].diagonal().mean()
            positive_own = getattr(own.details, name)[:, :4].diagonal().mean()
            torch.testing.assert_close(positive_same, 1 / model.temp.detach(), msg=name)
            assert positive_own < positive_same - 1.0, name
        # MLM distillation: the teacher reads the student's masked caption against its own image.
        text = model.config.text
        masked, labels = mask_tokens(input_ids, vocab_size=text.vocab_size, mask_token_id=text.mask_token_id,
                                     pad_token_id=text.pad_token_id, cls_token_id=text.cls_token_id,
                                     mlm_probability=model.config.mlm_probability, sample_seeds=seeds,
                                     draw_length=text.max_position_embeddings)
        image_embeds = model.encode_image(image)[0]
        teacher_embeds = model.encode_image_teacher(image_teacher)[0]
        expected = model.mlm_loss(masked, attention_mask, labels, image_embeds, teacher_embeds, 0.4)
        assert torch.equal(own.losses["mlm"], expected.loss) and not torch.equal(own.losses["mlm"], same.losses["mlm"])
    # In training the queues receive the teacher features of its own views.
    model.train()
    model(image, input_ids, attention_mask, alpha=0.4, sample_seeds=seeds, **views)
    _assert_queues_start_with_teacher_features(model, image_teacher, teacher_ids, teacher_mask)


def test_clip_mode_ignores_teacher_views_and_bad_ones_are_named():
    clip = _model("clip").eval()
    image, input_ids, attention_mask = _batch(clip.config)
    with torch.no_grad():
        plain = clip(image, input_ids, attention_mask, alpha=0.4)
        ignored = clip(image, input_ids, attention_mask, alpha=0.4, image_teacher=image[:1])  # not even checked
    assert torch.equal(plain.loss, ignored.loss)
    model = _model().eval()
    image_teacher, teacher_ids, teacher_mask = _second_view(model.config, image, input_ids, attention_mask)
    with pytest.raises(ValueError, match="image_teacher has 2 images but the batch has 4"):
        model(image, input_ids, attention_mask, alpha=0.4, image_teacher=image_teacher[:2])
    with pytest.raises(ValueError, match=r"image_teacher must have shape \(B, 3, 64, 64\)"):
        model(image, input_ids, attention_mask, alpha=0.4, image_teacher=image_teacher[:, :, :32])
    with pytest.raises(ValueError, match="teacher_input_ids and teacher_attention_mask must be given together"):
        model(image, input_ids, attention_mask, alpha=0.4, teacher_input_ids=teacher_ids)
    with pytest.raises(ValueError, match=r"teacher_attention_mask shape \(4, 5\) != teacher_input_ids shape"):
        model(image, input_ids, attention_mask, alpha=0.4, teacher_input_ids=teacher_ids,
              teacher_attention_mask=teacher_mask[:, :5])


@pytest.mark.parametrize("overrides", [{}, {"losses.mlm": False}, {"losses.mlm": False, "text.unpad": True},
                                       {"mode": "albef", "losses.mlm": False}, {"losses.itm": False}])
def test_every_trainable_parameter_gets_a_gradient(overrides):
    """DistributedDataParallel (without find_unused_parameters) fails on a trainable parameter no loss reaches."""
    model = _model(**overrides).train()
    model(*_batch(model.config), alpha=0.4).loss.backward()
    unreached = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unreached == []
