"""Reference loss curves: the packaged files, the binning, and a run warned when its lr is 100x off."""
from __future__ import annotations

import json

import pytest

from codis_lib.config import CONFIG_DIR
from codis_lib.run_config import load_run_config, run_config_names
from codis_lib.train.engine import train
from codis_lib.train.reference import REFERENCE_DIR, band, bin_records, load_reference
from codis_lib.train.reference_runs import build_curve, curve_settings, run_reference_seed, write_reference
from tests.helpers import tiny_run_overrides

ROOT = CONFIG_DIR.parents[1]


@pytest.mark.parametrize("name", run_config_names())
def test_every_packaged_config_ships_a_reference(name):
    reference = load_reference(REFERENCE_DIR / f"{name}.json")
    assert reference["config"] == name
    assert reference["status"] in ("measured", "not yet measured")
    if reference["status"] != "measured":
        assert reference["curves"] == [] and reference["note"]
        return
    for curve in reference["curves"]:
        script = curve["generated_by"].split()[1]
        assert (ROOT / script).is_file(), script
        assert curve["match"]["config"] == name
        ends = [b["end_step"] for b in curve["bins"]]
        assert ends == sorted(ends) and all(e % reference["bin_steps"] == 0 for e in ends)
        banded = [b for b in curve["bins"] if len(b["seeds"]) > 1]
        assert banded, f"{curve['name']}: no bin measured over two or more seeds"
        for b in banded:
            for term, stats in b["terms"].items():
                assert stats["lo"] <= stats["min"] <= stats["mean"] <= stats["max"] <= stats["hi"], (term, b)


def test_bins_are_step_weighted_means_of_whole_records():
    records = [{"step": s, "loss": float(s)} for s in (5, 10, 15, 20, 23, 30)]
    bins = bin_records(records, 10, ["loss"])
    assert bins == {10: {"loss": 7.5}, 20: {"loss": 17.5}, 30: {"loss": (23 * 3 + 30 * 7) / 10}}
    # A record straddling a boundary (steps 8-12) leaves that bin and the next unmeasured.
    assert bin_records([{"step": 8, "loss": 1.0}, {"step": 12, "loss": 1.0}, {"step": 20, "loss": 1.0}], 10,
                       ["loss"]) == {}
    stats = band([1.0, 2.0, 3.0], k_std=3.0, rel=0.05)
    assert (stats["mean"], stats["std"]) == (2.0, 1.0) and (stats["lo"], stats["hi"]) == (-2.0, 6.0)
    assert "lo" not in band([1.0], k_std=3.0, rel=0.05)


@pytest.mark.slow
def test_a_run_with_its_lr_100x_off_is_warned_and_a_reference_seed_is_not(tmp_path, capsys):
    """A reference measured here on the small corpus (2 seeds), then three runs of the same settings."""
    steps, bin_steps = 24, 4
    overrides = tiny_run_overrides(tmp_path / "run", steps) + ["train.batch_size=16", "model.queue_size=64",
                                                               "train.optimizer.lr=1e-3"]
    config = load_run_config("pretrain_emoji", overrides=overrides)
    runs = {seed: run_reference_seed(config, seed, steps=steps, schedule="max_steps", work_dir=tmp_path / "ref",
                                     log=lambda line: None) for seed in (0, 1)}
    curve = build_curve("test", curve_settings(config), runs, bin_steps=bin_steps, k_std=3.0, rel=0.05)
    path = tmp_path / "reference.json"
    write_reference(path, config="pretrain_emoji", curve=curve, bin_steps=bin_steps, k_std=3.0, rel=0.05,
                    generated_by="tools/reference_curves.py (test)")

    def run(seed: int, lr: float, name: str):
        more = [f"train.seed={seed}", f"train.optimizer.lr={lr}", f"train.reference_curves={path}",
                f"train.output_dir={tmp_path / name}"]
        return train(load_run_config("pretrain_emoji", overrides=overrides + more))

    normal = run(1, 1e-3, "normal")
    assert "compared with the band" in normal.reference_status
    assert normal.reference_warnings == []
    for lr in (0.1, 1e-5):
        result = run(0, lr, f"lr{lr}")
        assert result.reference_warnings, f"lr {lr}: no warning ({result.reference_status})"
        first = result.reference_warnings[0]
        term, step = first.split(" at step ")[0], int(first.split(" at step ")[1].split()[0])
        assert term == "loss" or term.startswith("loss/")
        assert step <= steps and "outside the reference band" in first and "pretrain_emoji" in first
    assert "WARNING: " in capsys.readouterr().err

    # Other settings (here the schedule's length): one line saying the check is off, and why.
    longer = train(load_run_config("pretrain_emoji", overrides=overrides + [
        "train.max_steps=8", f"train.reference_curves={path}", f"train.output_dir={tmp_path / 'other'}"]))
    assert "check off" in longer.reference_status and "total_steps: reference 24, this run 8" in longer.reference_status
    assert longer.reference_warnings == []
    assert json.loads(path.read_text())["curves"][0]["seeds"] == [0, 1]


def test_a_model_setting_newer_than_the_reference_matches_only_at_its_default():
    from codis_lib.train.reference import settings_differences

    reference = {"model": {"vision": {"width": 128}}, "task": "pretrain"}  # measured before `backbone` existed
    same = {"model": {"vision": {"width": 128, "backbone": "vit", "freeze_blocks": 0}}, "task": "pretrain"}
    assert settings_differences(reference, same) == []
    other = {"model": {"vision": {"width": 128, "backbone": "efficientnet_lite0"}}, "task": "pretrain"}
    assert settings_differences(reference, other) == [
        "model.vision.backbone: reference 'vit', this run 'efficientnet_lite0'"]
    assert settings_differences({"task": "pretrain"}, {"task": "finetune"}) == [
        "task: reference 'pretrain', this run 'finetune'"]
