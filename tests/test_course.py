"""The notebooks' set-up helper: folders, seed and threads at a size; the main model or a short pretraining; metrics."""
import json
import shutil

import pytest
import torch

from codis_lib import MainModelSource, load_main_model, main_model_source, start_notebook, write_metrics
from codis_lib.course import CI_MODEL_SETTINGS, CI_MODEL_STEPS
from codis_lib.run_config import parse_overrides
from tests.helpers import tiny_run_overrides


def test_start_notebook_creates_the_folders_and_seeds_torch(tmp_path):
    torch.manual_seed(3)
    first, second = torch.rand(4), torch.rand(4)
    torch.manual_seed(0)
    run = start_notebook("ci", tmp_path / "out" / "01", tmp_path / "figs", seed=3)
    assert run.size == "ci" and run.output_dir.is_dir() and run.figure_dir.is_dir()
    assert run.output_dir == tmp_path / "out" / "01" and run.seconds() >= 0.0
    assert torch.equal(torch.rand(4), first)
    start_notebook("full", tmp_path / "out" / "01", tmp_path / "figs")  # folders exist; no seed: the stream goes on
    assert torch.equal(torch.rand(4), second)


def test_start_notebook_sets_the_threads_only_when_asked(tmp_path):
    before = torch.get_num_threads()
    try:
        start_notebook("ci", tmp_path / "a", tmp_path / "f", num_threads=1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        start_notebook("ci", tmp_path / "a", tmp_path / "f")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_unknown_size_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="size='tiny'"):
        start_notebook("tiny", tmp_path / "out", tmp_path / "figs")
    with pytest.raises(ValueError, match="size='big'"):
        main_model_source("big", tmp_path, checkpoint="a", fallback_checkpoint="b", data_root="c", fallback_steps=1)
    assert not (tmp_path / "out").exists()


def test_metrics_round_trip_and_the_printout_hides_what_is_asked(tmp_path, capsys):
    metrics = {"size": "ci", "recall": {"itc": {"r_mean": 12.5}}, "figures": ["a.png"], "missing": None,
               "steps": 40, "ok": True}
    write_metrics(metrics, tmp_path, hide=("recall",))
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert list(json.loads((tmp_path / "metrics.json").read_text())) == list(metrics)  # order kept
    printed = json.loads(capsys.readouterr().out)
    assert printed == {key: value for key, value in metrics.items() if key != "recall"}


def test_a_value_json_cannot_write_is_an_error_naming_its_key(tmp_path):
    with pytest.raises(TypeError, match=r"metrics\['by_split'\]\['test'\] \(Tensor\)"):
        write_metrics({"size": "ci", "by_split": {"test": torch.tensor(1.0)}}, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_the_model_source_is_the_given_one_at_full_size_and_a_small_one_of_its_own_at_ci(tmp_path):
    given = dict(checkpoint="../runs/x/checkpoint_final.pt", fallback_checkpoint="outputs/04/checkpoint_final.pt",
                 data_root="../data/emoji", fallback_steps=150)
    full = main_model_source("full", tmp_path, **given)
    assert full == MainModelSource(**given) and dict(full.fallback_settings) == {}
    ci = main_model_source("ci", tmp_path, **given)
    small = str(tmp_path / "pretrain_ci" / "checkpoint_final.pt")
    assert ci.checkpoint == ci.fallback_checkpoint == small and ci.data_root == str(tmp_path / "emoji_ci")
    assert ci.fallback_steps == CI_MODEL_STEPS and dict(ci.fallback_settings) == CI_MODEL_SETTINGS
    ci.fallback_settings["train.batch_size"] = 4  # a copy: the next source is not affected
    assert main_model_source("ci", tmp_path, **given).fallback_settings["train.batch_size"] == 16


@pytest.mark.slow  # a 2-step pretraining run
def test_load_main_model_trains_the_fallback_once_then_loads_it_and_prefers_the_main_checkpoint(tmp_path, capsys):
    settings = parse_overrides(tiny_run_overrides(tmp_path / "unused", 1))
    data_root = settings.pop("data.root")
    settings.pop("train.output_dir")
    main, fallback = tmp_path / "main" / "checkpoint_final.pt", tmp_path / "fallback" / "checkpoint_final.pt"
    source = MainModelSource(str(main), str(fallback), data_root, 2, settings)

    first = load_main_model(source, num_threads=1)
    out = capsys.readouterr().out
    assert first.trained_now and first.step == 2 and fallback.is_file() and not main.exists()
    assert f"{main} not found" in out and "pretrained just now" in out

    again = load_main_model(source, num_threads=1)
    assert not again.trained_now and again.step == 2 and again.checkpoint == fallback
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))

    shutil.copytree(fallback.parent, main.parent)  # as if codis-pretrain had written the main checkpoint
    capsys.readouterr()
    scored = load_main_model(source, num_threads=1)
    assert scored.checkpoint == main and not scored.trained_now
    assert "not found" not in capsys.readouterr().out


def test_figures_default_to_the_output_folder_and_the_run_is_recorded(tmp_path):
    run = start_notebook("full", tmp_path / "out")
    assert run.figure_dir == tmp_path / "out" / "figures" and run.figure_dir.is_dir()
    record = json.loads((tmp_path / "out" / "notebook_run.json").read_text())
    assert record["size"] == "full" and record["figure_dir"] == str(run.figure_dir.resolve())
    assert set(record) >= {"started_at"} and set(record) - {"size", "figure_dir", "started_at"} in (
        set(), {"commit", "uncommitted_changes"})  # the commit only inside a git checkout
    assert start_notebook("ci", tmp_path / "out", tmp_path / "figs").figure_dir == tmp_path / "figs"
    assert json.loads((tmp_path / "out" / "notebook_run.json").read_text())["size"] == "ci"


def test_share_trunk_maps_points_the_trunk_cache_beside_the_output_folder_unless_set(tmp_path, monkeypatch):
    import os

    from codis_lib.model.trunk_store import TRUNK_CACHE_ENV

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != TRUNK_CACHE_ENV})
    start_notebook("ci", tmp_path / "outputs" / "04")
    assert TRUNK_CACHE_ENV not in os.environ  # only when asked
    start_notebook("ci", tmp_path / "outputs" / "05", share_trunk_maps=True)
    assert os.environ[TRUNK_CACHE_ENV] == str((tmp_path / "outputs" / "trunk_cache").resolve())
    os.environ[TRUNK_CACHE_ENV] = str(tmp_path / "mine")
    start_notebook("ci", tmp_path / "outputs" / "06", share_trunk_maps=True)
    assert os.environ[TRUNK_CACHE_ENV] == str(tmp_path / "mine")  # the user's choice stands
