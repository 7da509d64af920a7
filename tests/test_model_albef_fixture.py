"""Numeric parity with ALBEF: load the albef_tiny fixture through our loader and reproduce every tensor.

The fixture (tests/fixtures/albef_tiny/, see its README) holds a tiny ALBEF pretraining state dict,
a fixed batch, and the tensors ALBEF's own code computed from them. Tolerance: atol = rtol = 1e-4 in
float32, as the README recommends (observed float32-vs-float64 differences are <= 6e-6).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codis_lib.model import build_model
from codis_lib.model.albef_checkpoint import model_config_from_albef
from codis_lib.model.loading import load_albef_state_dict
from codis_lib.model.vit import interpolate_pos_embed

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "albef_tiny" / "albef_tiny.pt"
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def fixture() -> dict:
    if not FIXTURE.exists():
        pytest.fail(f"ALBEF parity fixture not found at {FIXTURE}; it is committed with the tests "
                    f"(tests/fixtures/albef_tiny/albef_tiny.pt), and without it the ALBEF parity check "
                    f"cannot run, so this test fails rather than skips.")
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def loaded(fixture):
    torch.manual_seed(123)  # a different init than the fixture's: loading must overwrite everything
    config = model_config_from_albef(fixture["config"], mode="albef", codebook_size=16)
    model = build_model(config).eval()
    state = {k: v.clone() for k, v in fixture["state_dict"].items()}
    report = load_albef_state_dict(model, {"model": state})  # ALBEF's checkpoint wrapper
    return model, report


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Assert allclose with the fixture tolerance; return the max abs difference (printed with -s)."""
    diff = (actual - expected).abs().max().item()
    print(f"{name}: max abs diff {diff:.2e}")
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.allclose(actual, expected, **TOL), f"{name}: max abs diff {diff:.3e} exceeds atol=rtol=1e-4"
    return diff


def test_every_key_is_accounted_for(fixture, loaded):
    model, report = loaded
    state = fixture["state_dict"]
    assert report.layout == "albef-pretrain"
    assert len(report.loaded) + len(report.dropped) == len(state) == 268
    assert sorted(report.dropped) == ["text_encoder.bert.embeddings.position_ids",
                                      "text_encoder_m.bert.embeddings.position_ids"]
    assert list(report.fresh) == ["codebook.weight", "idx_queue"]
    assert report.interpolated == [] and report.queues_reset == []
    ours = model.state_dict()
    for key in report.loaded:
        assert torch.equal(ours[key], state[key]), key
    tied = model.text_encoder.cls.predictions
    assert tied.decoder.weight is model.text_encoder.bert.embeddings.word_embeddings.weight


def test_encoders_match(fixture, loaded):
    model, _ = loaded
    inputs, expected = fixture["inputs"], fixture["expected"]
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(inputs["image"])
        text_embeds, text_feat = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        _close("image_embeds", image_embeds, expected["image_embeds"])
        _close("image_feat", image_feat, expected["image_feat"])
        _close("text_embeds", text_embeds[real], expected["text_embeds"][real])
        _close("text_feat", text_feat, expected["text_feat"])
        fusion = model.fusion_cls(image_embeds, text_embeds, inputs["attention_mask"])
        _close("fusion_cls", fusion, expected["fusion_cls"])
        _close("itm_logits", model.itm_logits(image_embeds, text_embeds, inputs["attention_mask"]),
               expected["itm_logits"])
        shuffled = image_embeds.roll(-1, dims=0)  # text i with image (i + 1) mod 4
        _close("fusion_cls_shuffled", model.fusion_cls(shuffled, text_embeds, inputs["attention_mask"]),
               expected["fusion_cls_shuffled"])
        _close("itm_logits_shuffled", model.itm_logits(shuffled, text_embeds, inputs["attention_mask"]),
               expected["itm_logits_shuffled"])
        _close("mlm_logits", model.mlm_logits(inputs["mlm_input_ids"], inputs["attention_mask"], image_embeds),
               expected["mlm_logits"])


def test_contrastive_and_mlm_losses_match(fixture, loaded):
    model, _ = loaded
    inputs, expected = fixture["inputs"], fixture["expected"]
    queue_before = model.text_queue.clone()
    with torch.no_grad():
        output = model(inputs["image"], inputs["input_ids"], inputs["attention_mask"], alpha=0.4,
                       return_details=True)
    _close("sim_i2t", output.details.sim_i2t, expected["sim_i2t"])
    _close("sim_t2i", output.details.sim_t2i, expected["sim_t2i"])
    _close("loss_i2t", output.diagnostics.align_i2t, expected["loss_i2t"])
    _close("loss_t2i", output.diagnostics.align_t2i, expected["loss_t2i"])
    _close("loss_ita", output.losses["align"], expected["loss_ita"])  # albef mode: L_align is ALBEF's ITC
    assert torch.equal(model.text_queue, queue_before) and int(model.queue_ptr) == 0  # eval leaves queues alone
    with torch.no_grad():
        image_embeds, _ = model.encode_image(inputs["image"])
        image_embeds_m, _ = model.encode_image_teacher(inputs["image"])
        loss, ce, distill, _ = model.mlm_loss(inputs["mlm_input_ids"], inputs["attention_mask"],
                                              inputs["mlm_labels"], image_embeds, image_embeds_m, alpha=0.4)
    _close("loss_mlm", loss, expected["loss_mlm"])
    _close("loss_mlm_ce", ce, expected["loss_mlm_ce"])
    _close("loss_mlm_distill", distill, expected["loss_mlm_distill"])


def test_training_forward_matches_and_enqueues(fixture):
    # ALBEF's full forward in train mode first applies the EMA update (teacher == student, so it moves
    # weights by at most one ulp), then enqueues the teacher features at queue_ptr.
    config = model_config_from_albef(fixture["config"], mode="albef", codebook_size=16)
    model = build_model(config).train()
    load_albef_state_dict(model, fixture["state_dict"])
    inputs, expected = fixture["inputs"], fixture["expected"]
    output = model(inputs["image"], inputs["input_ids"], inputs["attention_mask"], alpha=0.4)
    _close("loss_ita (train mode)", output.losses["align"].detach(), expected["loss_ita"])
    assert int(model.queue_ptr) == 4
    assert torch.allclose(model.image_queue[:, :4].t(), expected["image_feat"], **TOL)
    assert torch.allclose(model.text_queue[:, :4].t(), expected["text_feat"], **TOL)
    assert torch.equal(model.image_queue[:, 4:], fixture["state_dict"]["image_queue"][:, 4:])


def test_loader_refuses_missing_and_unexpected_keys(fixture):
    config = model_config_from_albef(fixture["config"], mode="albef", codebook_size=16)
    model = build_model(config)
    state = dict(fixture["state_dict"])
    del state["itm_head.bias"]
    del state["text_encoder_m.bert.encoder.layer.3.crossattention.self.key.weight"]
    state["text_encoder.bert.pooler.dense.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError) as info:
        load_albef_state_dict(model, state)
    message = str(info.value)
    assert "itm_head.bias" in message and "layer.3.crossattention.self.key.weight" in message
    assert "  unexpected keys (1): text_encoder.bert.pooler.dense.weight" in message.splitlines()
    wrong_queue = dict(fixture["state_dict"])
    wrong_queue["image_queue"] = torch.zeros(32, 128)
    with pytest.raises(ValueError, match="load_queues=False"):
        load_albef_state_dict(model, wrong_queue)
    report = load_albef_state_dict(model, wrong_queue, load_queues=False)
    assert "image_queue" in report.fresh


def test_loader_interpolates_pos_embed_for_another_image_size(fixture):
    albef_config = dict(fixture["config"], image_res=48)  # 6x6 grid instead of 4x4
    model = build_model(model_config_from_albef(albef_config, mode="albef", codebook_size=16))
    report = load_albef_state_dict(model, fixture["state_dict"])
    assert sorted(report.interpolated) == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    expected = interpolate_pos_embed(fixture["state_dict"]["visual_encoder.pos_embed"], 36)
    assert torch.allclose(model.visual_encoder.pos_embed, expected)
    assert model.encode_image(torch.randn(1, 3, 48, 48))[0].shape == (1, 37, 64)


def test_retrieval_layout_is_recognised(fixture):
    # ALBEF's retrieval model stores its BERT as text_encoder.* (a BertModel, no MLM head) plus idx_queue.
    state = {}
    for key, value in fixture["state_dict"].items():
        if ".cls." in key:
            continue
        state[key.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m.")] \
            = value
    state["idx_queue"] = torch.arange(64).reshape(1, 64)
    model = build_model(model_config_from_albef(fixture["config"], mode="albef", codebook_size=16)).eval()
    report = load_albef_state_dict(model, state)
    assert report.layout == "albef-retrieval"
    assert "text_encoder.cls.predictions.transform.dense.weight" in report.fresh
    assert torch.equal(model.idx_queue, state["idx_queue"])
    inputs, expected = fixture["inputs"], fixture["expected"]
    with torch.no_grad():
        _, text_feat = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    _close("text_feat (retrieval layout)", text_feat, expected["text_feat"])
