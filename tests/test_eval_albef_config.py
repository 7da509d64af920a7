"""ALBEF's config files as codis-eval reads them: an incomplete or mistyped config_bert.json is one line naming the
file and the key (exit status 2), not a KeyError traceback from deep in the model config."""
from __future__ import annotations

import json

import pytest

from codis_lib.evaluation.albef_models import ALBEF_BERT_CONFIG, albef_config
from codis_lib.evaluation.cli import eval_main
from codis_lib.model.albef_checkpoint import model_config_from_albef


def test_the_published_bert_config_passes_the_check(tmp_path):
    path = tmp_path / "config_bert.json"
    path.write_text(json.dumps(ALBEF_BERT_CONFIG))
    config = model_config_from_albef(albef_config(None, path), mode="albef")
    assert config.text.num_layers == 12 and config.text.fusion_layers == 6


@pytest.mark.parametrize("change, named", [({"num_hidden_layers": None}, "missing key(s) num_hidden_layers"),
                                           ({"fusion_layer": "six"}, "fusion_layer must be an integer")])
def test_an_incomplete_bert_config_is_one_line_naming_file_and_key(tmp_path, capsys, change, named):
    bert = {k: v for k, v in {**ALBEF_BERT_CONFIG, **change}.items() if v is not None}
    path = tmp_path / "config_bert.json"
    path.write_text(json.dumps(bert))
    checkpoint = tmp_path / "ALBEF.pth"
    checkpoint.write_bytes(b"")  # never read: the config is refused first
    annotation = tmp_path / "test.json"
    annotation.write_text("[]")
    status = eval_main(["--albef-checkpoint", str(checkpoint), "--bert-config", str(path), "--annotation",
                        str(annotation), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert str(path) in err and named in err
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):  # a dict given directly
        model_config_from_albef({"bert": bert, "embed_dim": 256, "queue_size": 64})
