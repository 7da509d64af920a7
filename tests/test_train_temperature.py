"""The contrastive temperature's options: fixed (model.learn_temp=false), or its own lr (train.optimizer.temp_lr)."""
import pytest
import torch

from codis_lib.checkpoint import load_checkpoint
from codis_lib.config import ConfigError, ModelConfig
from codis_lib.model import build_model
from codis_lib.run_config import load_run_config, run_config_from_dict
from codis_lib.train.engine import train
from codis_lib.metrics_log import read_jsonl
from codis_lib.train.schedule import WarmupCosineSchedule, adamw_param_groups, build_adamw
from tests.fixtures_data.corpus import small_emoji_corpus

TINY = ModelConfig.preset("tiny")


def _batch(config: ModelConfig, batch: int = 4, length: int = 8):
    gen = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    input_ids = torch.randint(10, config.text.vocab_size, (batch, length), generator=gen)
    input_ids[:, 0] = config.text.cls_token_id
    return torch.randn(batch, 3, size, size, generator=gen), input_ids, torch.ones_like(input_ids)


def _tiny_run(output_dir, steps: int, **extra):
    """Return the RunConfig of a seconds-long CODIS run on the small emoji corpus (32 px, batch 8)."""
    root, _ = small_emoji_corpus()
    overrides = {"data.root": str(root), "model.vision.image_size": 32, "model.queue_size": 32, "train.batch_size": 8,
                 "train.max_steps": steps, "train.log_every": 1, "train.eval.at_end": False,
                 "train.tensorboard": False, "train.progress": False, "train.output_dir": str(output_dir),
                 "train.num_threads": 1, **extra}
    return load_run_config("pretrain_emoji", overrides=overrides, world_size=1)


def test_a_fixed_temperature_keeps_its_state_dict_key_and_stays_out_of_the_optimizer():
    torch.manual_seed(0)
    learned = build_model(TINY)
    torch.manual_seed(0)
    fixed = build_model(TINY.with_overrides({"learn_temp": False}))
    assert list(fixed.state_dict()) == list(learned.state_dict())  # checkpoints load either way
    assert learned.temp.requires_grad and not fixed.temp.requires_grad
    optimizer = build_adamw(fixed, lr=1e-3, weight_decay=0.02)
    assert all(param is not fixed.temp for group in optimizer.param_groups for param in group["params"])
    fixed.train()
    for _ in range(3):
        output = fixed(*_batch(fixed.config), alpha=0.4)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert fixed.temp.grad is None and float(fixed.temp) == float(torch.tensor(TINY.temp))


def test_temp_lr_gives_the_temperature_its_own_group_on_the_same_schedule_shape():
    torch.manual_seed(0)
    model = build_model(TINY)
    default = adamw_param_groups(model, weight_decay=0.02)
    assert len(default) == 2 and all("lr_scale" not in group for group in default)
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.02, temp_lr=1e-4)
    groups = optimizer.param_groups
    assert len(groups) == 3 and len(groups[2]["params"]) == 1 and groups[2]["params"][0] is model.temp
    assert groups[2]["weight_decay"] == 0.0
    assert all(param is not model.temp for group in groups[:2] for param in group["params"])
    assert sum(len(g["params"]) for g in groups) == sum(len(g["params"]) for g in default)
    schedule = WarmupCosineSchedule(optimizer, total_steps=100, lr=1e-3, warmup_lr=1e-5, warmup_steps=10,
                                    min_lr=1e-6)
    for step in range(100):
        assert groups[2]["lr"] == pytest.approx(groups[0]["lr"] * 0.1, rel=1e-12)
        if step == 10:
            assert groups[2]["lr"] == pytest.approx(1e-4) and groups[0]["lr"] == pytest.approx(1e-3)
        schedule.step()
    with pytest.raises(ValueError, match="lr_scales names no_such, not trainable"):
        adamw_param_groups(model, 0.02, {"no_such": 2.0})


def test_the_trainer_keeps_a_fixed_temperature_and_schedules_temp_lr(tmp_path):
    fixed = train(_tiny_run(tmp_path / "fixed", 3, **{"model.learn_temp": False}))
    temperatures = [record["temperature"] for record in read_jsonl(tmp_path / "fixed" / "metrics.jsonl")
                    if "temperature" in record]
    assert len(temperatures) == 3 and temperatures == [pytest.approx(0.07, abs=1e-9)] * 3
    assert float(load_checkpoint(fixed.checkpoint)["model"]["temp"]) == float(torch.tensor(0.07))

    own = train(_tiny_run(tmp_path / "own", 3, **{"model.learn_temp": True, "train.optimizer.temp_lr": 5e-2}))
    stored = load_checkpoint(own.checkpoint)
    groups = stored["optimizer"]["param_groups"]
    assert len(groups) == 3 and len(groups[2]["params"]) == 1 and groups[2]["weight_decay"] == 0.0
    assert groups[2]["lr_scale"] == pytest.approx(5e-2 / 1e-3)
    assert groups[2]["lr"] == pytest.approx(groups[0]["lr"] * 50)
    assert float(stored["model"]["temp"]) != pytest.approx(0.07, abs=1e-4)  # it did learn, at a large lr


def test_bad_values_of_the_two_options_are_one_line_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"learn_temp must be true or false, got 'no'") as info:
        run_config_from_dict({"model": {"preset": "tiny", "learn_temp": "no"}})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"train\.optimizer\.temp_lr must be a number") as info:
        run_config_from_dict({"model": {"preset": "tiny"}, "train": {"optimizer": {"temp_lr": "fast"}}})
    assert "\n" not in str(info.value)
    for value, message in ((0.0, r"train\.optimizer\.temp_lr: must be > 0 or null, got 0\.0"),
                           (-1e-4, r"train\.optimizer\.temp_lr: must be > 0 or null")):
        with pytest.raises(ConfigError, match=message):
            run_config_from_dict({"model": {"preset": "tiny"}, "train": {"optimizer": {"temp_lr": value}}})
    with pytest.raises(ConfigError, match=r"train\.optimizer\.temp_lr: is 0\.0001 but model\.learn_temp is false"):
        run_config_from_dict({"model": {"preset": "tiny", "learn_temp": False},
                              "train": {"optimizer": {"temp_lr": 1e-4}}})
    # the tiny preset learns it (ALBEF); the laptop recipe holds it fixed (see pretrain_emoji.yaml)
    assert run_config_from_dict({"model": {"preset": "tiny"}}).model.learn_temp is True
    default = load_run_config("pretrain_emoji", world_size=1)
    assert default.model.learn_temp is False and default.train.optimizer.temp_lr is None
