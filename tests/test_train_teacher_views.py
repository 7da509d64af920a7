"""The training loop hands the teacher's own views to the model exactly when the model config asks for them."""
import pytest
import torch

from codis_lib.config import ModelConfig
from codis_lib.train.batches import teacher_batch_inputs, teacher_view_inputs

TINY = ModelConfig.preset("tiny")


def _batch(**extra):
    ids = torch.ones(2, 5, dtype=torch.long)
    return {"image": torch.zeros(2, 3, 8, 8), "input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


def test_views_follow_the_model_config_and_clip_has_none():
    assert teacher_view_inputs(TINY) == (False, False)
    both = TINY.with_overrides(teacher_view="own", teacher_text_view="other_caption")
    assert teacher_view_inputs(both) == (True, True)
    assert teacher_view_inputs(TINY.with_overrides(teacher_text_view="other_caption")) == (False, True)
    assert teacher_view_inputs(both.with_overrides(mode="clip")) == (False, False)  # no teacher to feed
    other = TINY.with_overrides(teacher_view="other_drawing")  # an image of its own: another drawing
    assert teacher_view_inputs(other) == (True, False)
    assert teacher_view_inputs(other.with_overrides(mode="clip")) == (False, False)
    dropout = TINY.with_overrides({"teacher_text_view": "dropout", "text.hidden_dropout": 0.1})
    assert teacher_view_inputs(dropout) == (False, False)  # the same caption: nothing more to load


def test_batch_inputs_are_the_views_asked_for_and_missing_ones_are_named():
    views = {"image_teacher": torch.ones(2, 3, 8, 8), "teacher_input_ids": torch.ones(2, 7, dtype=torch.long),
             "teacher_attention_mask": torch.ones(2, 7, dtype=torch.long)}
    assert teacher_batch_inputs(_batch(**views), TINY, torch.device("cpu")) == {}  # "same": today's forward
    own = teacher_batch_inputs(_batch(**views), TINY.with_overrides(teacher_view="own"), torch.device("cpu"))
    assert list(own) == ["image_teacher"] and torch.equal(own["image_teacher"], views["image_teacher"])
    both = TINY.with_overrides(teacher_view="own", teacher_text_view="other_caption")
    assert set(teacher_batch_inputs(_batch(**views), both, torch.device("cpu"))) == set(views)
    with pytest.raises(KeyError, match="teacher_input_ids, teacher_attention_mask"):
        teacher_batch_inputs(_batch(image_teacher=views["image_teacher"]), both, torch.device("cpu"))


def test_a_tiny_run_with_other_drawing_hands_the_teacher_the_other_familys_image(tmp_path, monkeypatch, one_thread):
    """model.teacher_view=other_drawing reaches the dataset: the teacher reads the emoji's other drawing."""
    import contextlib
    import io

    from codis_lib.data.datasets import PretrainDataset
    from codis_lib.train.cli import pretrain_main
    from tests.helpers import tiny_run_overrides

    batches = []
    load_items = PretrainDataset.load_items

    def recording(self, indices, generators=None):
        items = load_items(self, indices, generators)
        batches.append((self, items))
        return items

    monkeypatch.setattr(PretrainDataset, "load_items", recording)
    overrides = tiny_run_overrides(tmp_path, 3, **{"model.teacher_view": "other_drawing"})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert pretrain_main([a for value in overrides for a in ("--set", value)]) == 0, printed.getvalue()[-2000:]
    assert len(batches) >= 3
    dataset = batches[0][0]
    twins = alone = 0
    for _, items in batches:
        for item in items:
            others = dataset.siblings[item["index"]]
            same = torch.equal(item["image_teacher"], item["image"])
            assert same != bool(others)  # another drawing exactly when the emoji has one (no augmentation)
            twins, alone = twins + bool(others), alone + (not others)
    assert twins and alone
    batches.clear()  # clip has no teacher: the option is accepted and loads nothing more (mode sweeps keep working)
    overrides = tiny_run_overrides(tmp_path / "clip", 2, **{"model.teacher_view": "other_drawing", "model.mode": "clip"})
    with contextlib.redirect_stdout(printed):
        assert pretrain_main([a for value in overrides for a in ("--set", value)]) == 0, printed.getvalue()[-2000:]
    assert batches and all("image_teacher" not in item for _, items in batches for item in items)
