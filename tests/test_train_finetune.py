"""Reusing a pretraining checkpoint: load_or_train's fallback, and ALBEF-style retrieval fine-tuning from it."""
import pytest
import torch

from codis_lib.checkpoint import CheckpointMismatchError, load_checkpoint
from codis_lib.run_config import load_run_config
from codis_lib.model.pretrained import init_from_checkpoint
from codis_lib.train.engine import train
from codis_lib.train.load_or_train import load_or_train
from tests.helpers import tiny_run_overrides


@pytest.mark.slow  # a pretraining run, then fine-tuning from it
def test_load_or_train_trains_once_then_loads_and_finetuning_starts_from_it(tmp_path):
    checkpoint = tmp_path / "pretrain" / "checkpoint_final.pt"
    # The ViT tower: what this test checks is ALBEF's resampling of position embeddings to a new image size
    vit = ["model.vision.backbone=vit", "model.vision.pretrained=null", "model.vision.backbone_size=null"]
    overrides = [o for o in tiny_run_overrides(tmp_path / "ignored", 1) if not o.startswith("train.output_dir")] + vit
    first = load_or_train(checkpoint, overrides=overrides, fallback_steps=2)
    assert first.trained_now and first.step == 2 and checkpoint.is_file()
    again = load_or_train(checkpoint, overrides=overrides, fallback_steps=2)
    assert not again.trained_now and again.step == 2
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    assert not again.model.training and again.model_config.text.vocab_size == len(again.tokenizer)

    # Fine-tune at a larger image size (ALBEF: 256 -> 384 px): position embeddings are resampled.
    finetune_overrides = tiny_run_overrides(tmp_path / "finetune", 2) + [
        "model.vision.image_size=64", "model.losses.mlm=false", "data.max_tokens=30", f"train.init_from={checkpoint}",
        *vit]
    config = load_run_config("finetune_emoji", overrides=finetune_overrides)
    assert config.train.task == "finetune"
    result = train(config)
    assert result.finished
    assert set(k[len("loss/"):] for k in result.records[0] if k.startswith("loss/")) == {"align", "code", "ot", "itm"}
    tuned = load_checkpoint(result.checkpoint)["model"]
    pretrained = load_checkpoint(checkpoint)["model"]
    patch = config.model.vision.patch_size
    assert tuned["visual_encoder.pos_embed"].shape == (1, (64 // patch) ** 2 + 1, 128)  # resampled grid + CLS
    assert pretrained["visual_encoder.pos_embed"].shape == (1, (32 // patch) ** 2 + 1, 128)
    # Started from the pretrained text encoder (an untouched-by-resampling weight moved only by 2 small steps).
    start_gap = (tuned["text_proj.weight"] - pretrained["text_proj.weight"]).abs().max()
    assert start_gap < 0.05
    # Fine-tuning passes image ids: the id queue now holds real ids instead of the -100 "none" marker.
    assert (tuned["idx_queue"] >= 0).any()


def test_init_from_a_checkpoint_of_another_architecture_lists_the_problem(tmp_path):
    from codis_lib.config import ModelConfig
    from codis_lib.model import build_model

    small = build_model(ModelConfig.preset("tiny").with_overrides({"vision.image_size": 32, "queue_size": 16}))
    torch.save({"model": small.state_dict()}, tmp_path / "other.pt")
    wider = build_model(ModelConfig.preset("tiny").with_overrides({"vision.image_size": 32, "queue_size": 16,
                                                                    "embed_dim": 32}))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)other\.pt does not fit.*vision_proj\.weight: checkpoint \(64, 128\) vs model \(32, 128\)"):
        init_from_checkpoint(wider, tmp_path / "other.pt")
