"""The one loading path: each report category appears when it should, and one error lists every bad key."""
from __future__ import annotations

import ast
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from codis_lib.config import ModelConfig
from codis_lib.model import build_model
from codis_lib.model.loading import (QUEUE_KEYS, CheckpointMismatchError, adapt_codis, adapt_hf_bert, adapt_timm_vit,
                                     load_albef_state_dict, load_codis_weights, load_state_strict, read_state_dict,
                                     unwrap_state_dict)
from codis_lib.model.vit import interpolate_pos_embed
from tests.helpers import hf_bert_like

SMALL = ModelConfig.preset("tiny").with_overrides({"vision.image_size": 32, "queue_size": 16})


def _model(seed: int, **overrides):
    torch.manual_seed(seed)
    return build_model(SMALL.with_overrides(overrides))


def _copy(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_our_own_layout_loads_every_key_and_reports_nothing_else():
    source, model = _model(0), _model(1)
    report = load_state_strict(model, adapt_codis({"model": source.state_dict(), "step": 3}), "run/c.pt")
    assert report.layout == "codis" and report.source == "run/c.pt"
    assert report.loaded == sorted(source.state_dict())
    assert report.fresh == {} and report.dropped == {} and report.interpolated == [] and report.queues_reset == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    text_encoder = model.text_encoder
    assert text_encoder.cls.predictions.decoder.weight is text_encoder.bert.embeddings.word_embeddings.weight


def test_finetuning_init_resamples_pos_embed_and_resets_queues_of_another_length(tmp_path):
    source = _model(0)
    torch.save({"model": source.state_dict()}, tmp_path / "pre.pt")
    model = _model(1, **{"vision.image_size": 64, "queue_size": 24})
    fresh_queues = {key: getattr(model, key).clone() for key in QUEUE_KEYS}
    lines: list[str] = []
    report = load_codis_weights(model, tmp_path / "pre.pt", log=lines.append)
    assert sorted(report.interpolated) == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    expected = interpolate_pos_embed(source.visual_encoder.pos_embed.detach(), 16)  # 2x2 -> 4x4 patches
    assert torch.equal(model.visual_encoder.pos_embed, expected)
    assert report.queues_reset == list(QUEUE_KEYS)
    assert sorted(report.fresh) == sorted(QUEUE_KEYS) and all("another length" in why for why in report.fresh.values())
    assert sorted(report.dropped) == sorted(QUEUE_KEYS)  # the checkpoint's queues, not loaded
    assert not set(report.loaded) & set(QUEUE_KEYS)
    assert all(torch.equal(getattr(model, key), value) for key, value in fresh_queues.items())
    assert len(lines) == 3 and "resampling visual_encoder.pos_embed (1, 5, 128) -> (1, 17, 128)" in lines[0]
    assert lines[2].endswith("image_queue has shape (64, 16), the model (64, 24); starting with fresh queues")


def test_queues_load_by_default_and_reset_on_request():
    source = _model(0)
    model = _model(1)
    kept = {key: getattr(model, key).clone() for key in QUEUE_KEYS}
    report = load_state_strict(model, source.state_dict(), queues="reset")
    assert report.queues_reset == list(QUEUE_KEYS) and sorted(report.fresh) == sorted(QUEUE_KEYS)
    assert all(torch.equal(getattr(model, key), value) for key, value in kept.items())
    report = load_state_strict(model, source.state_dict())
    assert report.queues_reset == [] and set(QUEUE_KEYS) <= set(report.loaded)
    assert torch.equal(model.image_queue, source.image_queue)
    resized = dict(source.state_dict(), image_queue=torch.zeros(64, 8))
    with pytest.raises(CheckpointMismatchError, match=r"\(queues: pass queues='reset' to start them fresh\)"):
        load_state_strict(model, resized)


def test_one_error_lists_missing_unexpected_and_misshapen_keys_and_loads_nothing():
    model = _model(1)
    before = _copy(model)
    state = _copy(_model(0))
    del state["itm_head.weight"], state["temp"]
    state["extra.weight"], state["another.bias"] = torch.zeros(1), torch.zeros(2)
    state["vision_proj.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_strict(model, state, "other.pt", target="the model", hint="check the model config")
    lines = str(info.value).split("\n")
    assert lines == ["other.pt does not fit the model:",
                     "  missing keys (2): itm_head.weight, temp",
                     "  unexpected keys (2): another.bias, extra.weight",
                     "  shape mismatches (1): vision_proj.bias: checkpoint (7,) vs model (64,)",
                     "  check the model config"]
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())  # nothing loaded


def test_keys_left_fresh_by_an_adapter_are_not_missing_and_carry_their_reason():
    # An ALBEF pretraining checkpoint is our layout without the codebook and idx_queue, plus position_ids.
    source = _model(0)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("codebook.") and k != "idx_queue"}
    for encoder in ("text_encoder", "text_encoder_m"):
        state[f"{encoder}.bert.embeddings.position_ids"] = torch.arange(64)[None, :]
    model = _model(1)
    codebook = model.codebook.weight.detach().clone()
    report = load_albef_state_dict(model, {"model": state})
    assert report.layout == "albef-pretrain"
    assert list(report.fresh) == ["codebook.weight", "idx_queue"]
    assert "ALBEF has none" in report.fresh["codebook.weight"] and "image-id queue" in report.fresh["idx_queue"]
    assert sorted(report.dropped) == ["text_encoder.bert.embeddings.position_ids",
                                      "text_encoder_m.bert.embeddings.position_ids"]
    assert torch.equal(model.codebook.weight, codebook) and len(report.loaded) + 2 == len(state)
    state["text_encoder.bert.embeddings.position_ids"] = torch.arange(64).flip(0)[None, :]
    with pytest.raises(ValueError, match="expected positions 0..63"):
        load_albef_state_dict(model, state)


def test_bert_weights_leave_cross_attention_fresh_and_drop_what_we_do_not_use():
    text = SMALL.text
    bert = hf_bert_like(text)
    state = dict(bert.state_dict())
    state["bert.embeddings.LayerNorm.gamma"] = state.pop("bert.embeddings.LayerNorm.weight")  # an old release's name
    state["bert.pooler.dense.weight"] = torch.zeros(text.hidden_size, text.hidden_size)
    state["cls.seq_relationship.weight"] = torch.zeros(2, text.hidden_size)
    encoder = _model(1).text_encoder
    report = load_state_strict(encoder, adapt_hf_bert(state, encoder.state_dict()), "BERT weights",
                               target="the text encoder")
    cross = sorted(key for key in encoder.state_dict() if ".crossattention." in key)
    assert len(cross) == 2 * 10 and list(report.fresh) == cross  # 2 fusion layers, 10 tensors each
    assert all("not in BERT" in why for why in report.fresh.values())
    assert {"bert.pooler.dense.weight", "cls.seq_relationship.weight"} <= set(report.dropped)
    assert "bert.embeddings.LayerNorm.weight" in report.loaded
    assert torch.equal(encoder.bert.embeddings.LayerNorm.weight, state["bert.embeddings.LayerNorm.gamma"])
    assert torch.equal(encoder.state_dict()["bert.encoder.layer.3.attention.self.query.weight"],
                       state["bert.encoder.layer.3.attention.self.query.weight"])


def test_vit_weights_drop_the_head_and_resample_the_grid():
    vision = SMALL.vision
    torch.manual_seed(0)
    deit = VisionTransformer(img_size=48, patch_size=vision.patch_size, embed_dim=vision.width, depth=vision.depth,
                             num_heads=vision.num_heads, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             num_classes=10)
    vit = _model(1).visual_encoder
    report = load_state_strict(vit, adapt_timm_vit({"model": deit.state_dict()}), "deit.pth", resample=True)
    assert report.layout == "timm-vit" and list(report.dropped) == ["head.weight", "head.bias"]
    assert report.interpolated == ["pos_embed"] and report.fresh == {}
    assert torch.equal(vit.pos_embed, interpolate_pos_embed(deit.pos_embed.detach(), 4))  # 3x3 -> 2x2 patches
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches \(1\): pos_embed: checkpoint \(1, 10, 128\)"):
        load_state_strict(vit, adapt_timm_vit(deit.state_dict()), "deit.pth")  # resampling is opt-in


def test_reading_and_unwrapping_files(tmp_path):
    state = {"w": torch.arange(3.0)}
    torch.save({"state_dict": state}, tmp_path / "a.pth")
    save_file(state, str(tmp_path / "b.safetensors"))
    for name in ("a.pth", "b.safetensors"):
        assert torch.equal(read_state_dict(tmp_path / name)["w"], state["w"])
    with pytest.raises(FileNotFoundError, match=r"ALBEF checkpoint .*missing\.pth does not exist"):
        read_state_dict(tmp_path / "missing.pth", "ALBEF checkpoint")
    with pytest.raises(ValueError, match=r"x\.pt does not hold a state dict: entries \['step'\] are not tensors"):
        unwrap_state_dict({"w": torch.zeros(1), "step": 3}, "x.pt")
    with pytest.raises(ValueError, match="queues must be one of"):
        load_state_strict(_model(0), {}, queues="sometimes")


def test_the_model_layer_does_not_import_training_or_evaluation():
    model_dir = Path(__file__).resolve().parents[1] / "codis_lib" / "model"
    for path in sorted(model_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("codis_lib.train", "codis_lib.evaluation")), f"{path.name} imports {name}"
