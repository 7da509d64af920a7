"""ModelConfig: presets, strict YAML loading, and clear errors naming the offending key."""
from __future__ import annotations

import pytest
import yaml

from codis_lib.config import ConfigError, ModelConfig, load_model_config, preset_names


def test_presets_load_and_base_is_the_paper_size():
    assert set(preset_names()) == {"tiny", "base"}
    base = ModelConfig.preset("base")
    assert base == ModelConfig()  # dataclass defaults are the base size
    assert (base.vision.width, base.vision.depth, base.vision.patch_size) == (768, 12, 16)
    assert (base.text.num_layers, base.text.fusion_layers, base.text.text_layers) == (12, 6, 6)
    assert (base.embed_dim, base.queue_size, base.temp, base.momentum, base.alpha) == (256, 65536, 0.07, 0.995, 0.4)
    assert (base.sinkhorn_eps, base.sinkhorn_iters, base.codebook_temperature) == (0.05, 3, 0.1)
    tiny = ModelConfig.preset("tiny")
    assert tiny.vision.image_size == 64 and tiny.text.fusion_layers == 2 and tiny.mode == "codis"


def test_round_trip_through_yaml(tmp_path):
    tiny = ModelConfig.preset("tiny").with_overrides({"mode": "albef", "losses.mlm_weight": 0.5})
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(tiny.to_dict()))
    assert load_model_config(path) == tiny


def test_mode_defaults_and_switches():
    tiny = ModelConfig.preset("tiny")
    assert all(tiny.active_losses().values())
    albef = tiny.with_overrides(mode="albef").active_losses()
    assert albef == {"align": True, "align_unimodal": False, "code": False, "ot": False, "itm": True, "mlm": True}
    clip = tiny.with_overrides(mode="clip").active_losses()
    assert [k for k, on in clip.items() if on] == ["align"]
    ablation = tiny.with_overrides({"losses.align_unimodal": False, "losses.ot": False}).active_losses()
    assert not ablation["align_unimodal"] and not ablation["ot"] and ablation["code"]


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("preset: tiny\ntext:\n  fusion_layer: 2\n")
    with pytest.raises(ConfigError) as info:
        load_model_config(path)
    message = str(info.value)
    assert str(path) in message and "text.fusion_layer" in message and "fusion_layers" in message


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"vision\.width must be an integer, got '128'"):
        ModelConfig.from_dict({"preset": "tiny", "vision": {"width": "128"}})
    with pytest.raises(ConfigError, match=r"sinkhorn_log_domain must be true or false"):
        ModelConfig.from_dict({"sinkhorn_log_domain": 1})
    with pytest.raises(ConfigError, match=r"mode must be one of 'clip', 'albef', 'codis'"):
        ModelConfig.from_dict({"mode": "blip"})
    # YAML 1.1 reads 1e-6 without a dot as a string; a float field accepts it.
    assert ModelConfig.from_dict({"vision": {"norm_eps": "1e-6"}}).vision.norm_eps == 1e-6


@pytest.mark.parametrize("overrides, key", [
    ({"text.fusion_layers": 5}, "text.fusion_layers"),  # more fusion layers than the 4 in total
    ({"text.fusion_layers": 4}, "text.fusion_layers"),  # no text-only layer left
    ({"vision.patch_size": 7}, "vision.image_size"),  # 64 px is not a multiple of 7
    ({"text.num_heads": 3}, "text.num_heads"),  # 128 not divisible by 3
    ({"temp": 0.9}, "temp"),  # outside the clamp range
    ({"text.mask_token_id": 5000}, "text.mask_token_id"),  # outside the vocabulary
    ({"mode": "albef", "losses.code": True}, "losses.code"),  # no codebook in albef
    ({"losses.align": False}, "losses.align_unimodal"),  # unimodal pair without L_align
])
def test_impossible_combinations(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.preset("tiny").with_overrides(overrides)


def test_validate_for_batch():
    tiny = ModelConfig.preset("tiny")  # queue 256
    tiny.validate_for_batch(64)
    tiny.validate_for_batch(128)
    with pytest.raises(ConfigError, match=r"queue_size: 256 is not divisible by the global batch 96"):
        tiny.validate_for_batch(96)
    tiny.with_overrides(mode="clip").validate_for_batch(96)  # clip has no queue
    with pytest.raises(ConfigError, match="hard negatives"):
        tiny.with_overrides(queue_size=1).validate_for_batch(1)


def test_unknown_preset_and_override_key():
    with pytest.raises(ConfigError, match="valid presets: base, tiny"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="no key 'widht' under vision"):
        ModelConfig.preset("tiny").with_overrides({"vision.widht": 3})


def test_teacher_views_are_validated_naming_the_key(tmp_path):
    tiny = ModelConfig.preset("tiny")
    assert (tiny.teacher_view, tiny.teacher_text_view) == ("same", "same")  # ALBEF's single view by default
    assert tiny.with_overrides(teacher_view="own", teacher_text_view="other_caption").teacher_view == "own"
    assert tiny.with_overrides(teacher_view="other_drawing").teacher_view == "other_drawing"
    path = tmp_path / "views.yaml"
    path.write_text(yaml.safe_dump({"preset": "tiny", "teacher_view": "both"}))
    with pytest.raises(ConfigError, match=r"teacher_view must be one of 'same', 'own', 'other_drawing', got 'both'"):
        load_model_config(path)
    with pytest.raises(ConfigError, match="teacher_text_view must be one of"):
        tiny.with_overrides(teacher_text_view="augment")
    # "dropout" needs text dropout: the tiny preset has none, so the two text views would be identical.
    with pytest.raises(ConfigError, match=r"teacher_text_view: 'dropout' needs text dropout.*text.hidden_dropout"):
        tiny.with_overrides(teacher_text_view="dropout")
    assert tiny.with_overrides({"teacher_text_view": "dropout", "text.hidden_dropout": 0.1}).teacher_text_view \
        == "dropout"
    assert ModelConfig.preset("base").with_overrides(teacher_text_view="dropout").text.hidden_dropout == 0.1
    bad = ModelConfig(teacher_view="twice")  # built directly, past the typed loader: validate still names it
    with pytest.raises(ConfigError, match="teacher_view: must be one of same, own, other_drawing, got 'twice'"):
        bad.validate()
    # clip mode has no teacher: the switch is accepted and has no effect there (mode sweeps keep working).
    assert tiny.with_overrides(mode="clip", teacher_view="own").mode == "clip"
