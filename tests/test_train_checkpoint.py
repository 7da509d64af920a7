"""Checkpoints: atomic writes, strict loading that lists keys, RNG round trip, latest/prune bookkeeping."""
import random

import numpy as np
import pytest
import torch

from codis_lib.checkpoint import (CheckpointMismatchError, capture_rng_state, checkpoint_path, find_latest_checkpoint,
                                  list_checkpoints, load_checkpoint, prune_checkpoints,
                                  restore_rng_state, save_atomic)
from codis_lib.config import ModelConfig
from codis_lib.model import build_model
from codis_lib.model.loading import load_state_strict


def _tiny_model(**overrides):
    config = ModelConfig.preset("tiny").with_overrides({"vision.image_size": 32, "queue_size": 16, **overrides})
    return build_model(config)


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "checkpoint_00000001.pt"
    save_atomic({"model": {"w": torch.arange(3.0)}, "step": 1}, path)
    with pytest.raises(Exception):
        save_atomic({"model": {"w": torch.zeros(3)}, "unpicklable": lambda: None}, path)  # dies mid-write
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


def test_strict_loading_lists_missing_unexpected_and_misshapen_keys():
    model = _tiny_model()
    state = dict(model.state_dict())
    load_state_strict(_tiny_model(), state)  # the model's own state fits
    del state["itm_head.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["vision_proj.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_strict(_tiny_model(), state, source="run/checkpoint_00000009.pt")
    message = str(info.value)
    assert "run/checkpoint_00000009.pt" in message
    assert "missing keys (1): itm_head.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "vision_proj.bias: checkpoint (7,) vs model (64,)" in message


def test_queues_pointer_codebook_and_teacher_are_part_of_the_saved_state():
    keys = set(_tiny_model().state_dict())
    for key in ("image_queue", "text_queue", "idx_queue", "queue_ptr", "temp", "codebook.weight",
                "visual_encoder_m.cls_token", "text_proj_m.weight"):
        assert key in keys


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_atomic({"model": {}, "rng": [capture_rng_state()]}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])


def test_latest_is_the_highest_step_and_pruning_keeps_the_newest(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for step in (5, 40, 12):
        save_atomic({"model": {}, "step": step}, checkpoint_path(tmp_path, step))
    (tmp_path / "checkpoint_final.pt").write_bytes(b"")  # not a numbered checkpoint
    assert find_latest_checkpoint(tmp_path).name == "checkpoint_00000040.pt"
    assert [p.name for p in prune_checkpoints(tmp_path, keep_last=2)] == ["checkpoint_00000005.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_00000012.pt", "checkpoint_00000040.pt"]


def test_compiling_the_blocks_keeps_the_checkpoint_keys():
    from codis_lib.train.setup import compile_transformer_blocks

    model = _tiny_model()
    keys = list(model.state_dict())
    # 3 ViT blocks + 4 BERT layers, student and teacher (compiled lazily: nothing runs here).
    assert compile_transformer_blocks(model) == 14
    assert list(model.state_dict()) == keys
