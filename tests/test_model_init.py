"""Pretrained initialisation: DeiT/timm ViT and BERT weights from local files; a clear error offline."""
from __future__ import annotations

from functools import partial

import huggingface_hub.constants
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertForMaskedLM

from codis_lib.config import ModelConfig
from codis_lib.model import build_model
from codis_lib.model.pretrained import load_bert_weights, load_vit_weights
from codis_lib.model.vit import interpolate_pos_embed
from tests.helpers import hf_bert_like

TINY = ModelConfig.preset("tiny")


def test_vit_from_a_deit_style_file_with_another_image_size(tmp_path):
    vision = TINY.vision
    torch.manual_seed(0)
    deit = VisionTransformer(img_size=32, patch_size=vision.patch_size, embed_dim=vision.width, depth=vision.depth,
                             num_heads=vision.num_heads, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             num_classes=10)  # a classifier head, as DeiT's file has
    path = tmp_path / "deit.pth"
    torch.save({"model": deit.state_dict()}, path)  # DeiT's release wraps the weights in {'model': ...}
    model = build_model(TINY.with_overrides({"vision.pretrained": str(path)}))
    source = deit.state_dict()
    ours = model.visual_encoder.state_dict()
    assert torch.equal(ours["blocks.1.attn.qkv.weight"], source["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(ours["pos_embed"], interpolate_pos_embed(source["pos_embed"], 16))  # 2x2 -> 4x4
    # The teacher starts as a copy of the initialised student.
    teacher = model.visual_encoder_m.state_dict()
    assert torch.equal(teacher["blocks.0.mlp.fc1.weight"], source["blocks.0.mlp.fc1.weight"])
    assert list(load_vit_weights(model.visual_encoder, str(path)).dropped) == ["head.weight", "head.bias"]


def test_bert_from_a_save_pretrained_directory(tmp_path):
    bert = hf_bert_like(TINY.text)
    bert.save_pretrained(tmp_path / "bert")
    model = build_model(TINY)
    cross_before = model.text_encoder.bert.encoder.layer[3].crossattention.self.key.weight.detach().clone()
    load_bert_weights(model.text_encoder, str(tmp_path / "bert"))
    source = bert.state_dict()
    ours = model.text_encoder.state_dict()
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.3.attention.self.query.weight",
                "bert.encoder.layer.3.output.dense.bias", "cls.predictions.transform.dense.weight"):
        assert torch.equal(ours[key], source[key]), key
    # BERT has no cross-attention: ALBEF's fusion layers keep a random one.
    assert torch.equal(model.text_encoder.bert.encoder.layer[3].crossattention.self.key.weight, cross_before)
    word_embeddings = model.text_encoder.bert.embeddings.word_embeddings.weight
    assert model.text_encoder.cls.predictions.decoder.weight is word_embeddings


def test_a_mismatched_bert_is_refused(tmp_path):
    bert = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64))
    bert.save_pretrained(tmp_path / "small")
    model = build_model(TINY)
    with pytest.raises(ValueError, match="does not fit the text encoder:\n  missing keys"):
        load_bert_weights(model.text_encoder, str(tmp_path / "small"))


def test_hub_names_fail_offline_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = build_model(TINY)
    with pytest.raises(RuntimeError, match=r"To run offline.*model\.text\.pretrained"):
        load_bert_weights(model.text_encoder, "bert-base-uncased")
    with pytest.raises(RuntimeError, match=r"To run offline.*model\.vision\.pretrained"):
        load_vit_weights(model.visual_encoder, "deit_base_patch16_224")
    with pytest.raises(FileNotFoundError, match="neither an existing weights file nor a timm model name"):
        load_vit_weights(model.visual_encoder, "weights/missing_deit.pth")
