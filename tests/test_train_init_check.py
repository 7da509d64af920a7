"""Training refuses to start from an initialisation that did not load every tensor the config asks for."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from codis_lib.config import ModelConfig
from codis_lib.model import build_model
from codis_lib.model.pretrained import load_vit_weights
from codis_lib.model.loading import LoadReport, load_codis_weights
from codis_lib.model.verify import InitialisationError, verify_load, verify_pretrained
from codis_lib.train.cli import pretrain_main
from tests.helpers import hf_bert_like, tiny_run_overrides

TINY = ModelConfig.preset("tiny")


def _vit_file(tmp_path, depth: int = TINY.vision.depth, img_size: int = 32):
    vision = TINY.vision
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=img_size, patch_size=vision.patch_size, embed_dim=vision.width, depth=depth,
                            num_heads=vision.num_heads, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                            num_classes=10)
    path = tmp_path / f"vit{depth}.pth"
    torch.save(vit.state_dict(), path)
    return path


def _bert_dir(tmp_path, layers: int):
    bert = hf_bert_like(TINY.text, num_layers=layers)
    bert.save_pretrained(tmp_path / f"bert{layers}")
    return tmp_path / f"bert{layers}"


def test_fully_loaded_encoders_pass_in_student_and_teacher(tmp_path):
    config = TINY.with_overrides({"vision.pretrained": str(_vit_file(tmp_path)),
                                  "text.pretrained": str(_bert_dir(tmp_path, TINY.text.num_layers))})
    model = build_model(config)
    assert set(model.pretrained_loads) == {"model.vision.pretrained", "model.text.pretrained"}
    checked = verify_pretrained(model, config)
    vit_keys, text_keys = len(model.visual_encoder.state_dict()), len(model.text_encoder.state_dict())
    fresh = len(model.pretrained_loads["model.text.pretrained"].fresh)  # cross-attention: not in BERT
    assert fresh > 0 and checked == 2 * (vit_keys + text_keys - fresh)


def test_student_loaded_but_teacher_not_copied_is_refused(tmp_path):
    model = build_model(TINY)
    report = load_vit_weights(model.visual_encoder, str(_vit_file(tmp_path)))  # no copy_student_to_teacher
    assert verify_load(report, model.visual_encoder, config_key="model.vision.pretrained") > 0
    config = TINY.with_overrides({"vision.pretrained": "deit.pth"})
    model.pretrained_loads = {"model.vision.pretrained": report}
    with pytest.raises(InitialisationError, match=r"^model\.vision\.pretrained: refusing to start, ViT weights .* "
                                                  r"did not initialise visual_encoder_m: \d+ of \d+ tensors do not "
                                                  r"hold the source's values .* first cls_token"):
        verify_pretrained(model, config)


def test_a_tensor_overwritten_after_the_load_is_named(tmp_path):
    model = build_model(TINY)
    report = load_vit_weights(model.visual_encoder, str(_vit_file(tmp_path)))
    with torch.no_grad():
        model.visual_encoder.blocks[1].mlp.fc2.weight[-1, -1] += 1.0  # one element: only the sum sees it
    with pytest.raises(InitialisationError, match=r"1 of \d+ tensors do not hold .* first blocks\.1\.mlp\.fc2\.weight$"):
        verify_load(report, model.visual_encoder, config_key="model.vision.pretrained")


def test_a_report_with_nothing_loaded_or_a_key_never_reached_is_refused(tmp_path):
    model = build_model(TINY)
    empty = LoadReport(source="weights/minilm", layout="minilm")
    with pytest.raises(InitialisationError, match=r"the load reports 0 tensors loaded \(of \d+ expected\)"):
        verify_load(empty, model.text_encoder, config_key="model.text.pretrained")
    partial_report = LoadReport(source="weights/minilm", layout="minilm", loaded=["bert.embeddings.word_embeddings.weight"])
    with pytest.raises(InitialisationError, match=r"tensors were not loaded, first bert\.embeddings\."):
        verify_load(partial_report, model.text_encoder, config_key="model.text.pretrained")
    # The config names weights the model was built without.
    with pytest.raises(InitialisationError, match=r"^model\.text\.pretrained: refusing to start, it names 'bert' "
                                                  r"but no weights were loaded"):
        verify_pretrained(model, TINY.with_overrides({"text.pretrained": "bert"}))


def test_a_bert_with_fewer_layers_than_text_plus_fusion_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^model\.text\.pretrained: BERT weights .* does not fit the text encoder:\n"
                                         r"  missing keys \(\d+\): bert\.encoder\.layer\.3\."):
        build_model(TINY.with_overrides({"text.pretrained": str(_bert_dir(tmp_path, TINY.text.num_layers - 1))}))


def test_init_from_checkpoint_is_verified(tmp_path):
    torch.manual_seed(1)
    source = build_model(TINY)
    torch.save({"model": source.state_dict()}, tmp_path / "checkpoint.pt")
    model = build_model(TINY)
    report = load_codis_weights(model, tmp_path / "checkpoint.pt")
    assert verify_load(report, model, config_key="train.init_from") == len(model.state_dict())


@pytest.mark.slow
def test_the_trainer_refuses_a_partial_vit_with_exit_2(tmp_path, capsys):
    path = _vit_file(tmp_path, depth=TINY.vision.depth - 1)  # the last ViT block would stay random
    args = []
    vit = ["model.vision.backbone=vit", "model.vision.backbone_size=null"]  # the default's tower is ImageNet's CNN
    for item in tiny_run_overrides(tmp_path / "run", 2) + vit + [f"model.vision.pretrained={path}"]:
        args += ["--set", item]
    assert pretrain_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("codis-pretrain: model.vision.pretrained: ViT weights")
    assert f"missing keys ({len(build_model(TINY).visual_encoder.blocks[-1].state_dict())}): blocks.2." in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step
