"""Stop after N steps and resume for N more == 2N uninterrupted steps, bit for bit on CPU; NaN stops cleanly."""
import hashlib

import pytest
import torch

from codis_lib.checkpoint import list_checkpoints, load_checkpoint
from codis_lib.run_config import load_run_config
from codis_lib.train.cli import pretrain_main
from codis_lib.train.engine import NonFiniteLossError, train
from tests.helpers import tiny_run_overrides


def _cli(overrides, *flags):
    argv = [item for value in overrides for item in ("--set", value)]
    return pretrain_main(argv + list(flags))


@pytest.mark.slow  # two CLI training runs of 6 steps
def test_stop_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, capsys):
    # Dropout and augmentation on: the random generator states must really be restored.
    dropout = ["model.text.hidden_dropout=0.1", "model.text.attention_dropout=0.1"]
    whole = tiny_run_overrides(tmp_path / "whole", 6) + dropout
    assert _cli(whole) == 0
    split = tiny_run_overrides(tmp_path / "split", 6) + dropout
    assert _cli(split, "--stop-at-step", "3") == 0
    first_leg = load_checkpoint(tmp_path / "split" / "checkpoint_00000003.pt")
    assert first_leg["step"] == 3 and not (tmp_path / "split" / "checkpoint_final.pt").exists()
    assert _cli(split, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out

    uninterrupted = load_checkpoint(tmp_path / "whole" / "checkpoint_final.pt")
    resumed = load_checkpoint(tmp_path / "split" / "checkpoint_final.pt")
    assert uninterrupted["step"] == resumed["step"] == 6
    different = [k for k in uninterrupted["model"] if not torch.equal(uninterrupted["model"][k], resumed["model"][k])]
    assert different == []
    # The first leg really trained: its weights differ from the end of the run.
    assert not torch.equal(first_leg["model"]["vision_proj.weight"], resumed["model"]["vision_proj.weight"])
    for state_a, state_b in zip(uninterrupted["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])
    # The two legs together logged each step once, with the same losses as the uninterrupted run.
    from codis_lib.metrics_log import read_jsonl

    assert [r["loss"] for r in read_jsonl(tmp_path / "split" / "metrics.jsonl")] == \
        [r["loss"] for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl")]


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _poison_loss_term(monkeypatch, term, at_step, resumed_from):
    """Patch the model's forward to return NaN for loss `term` and the total at step `at_step`; return the steps seen.

    The run resumes after step `resumed_from` and takes one forward per step (no accumulation), so the
    n-th forward after patching belongs to optimizer step `resumed_from + n`.
    """
    from codis_lib.model.codis import CODIS

    original = CODIS.forward
    forwards = []

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        forwards.append(resumed_from + len(forwards) + 1)  # the optimizer step this forward belongs to
        if forwards[-1] == at_step:
            output.losses = {**output.losses, term: output.losses[term] * float("nan")}
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(CODIS, "forward", forward)
    return forwards


@pytest.mark.slow  # CLI training runs, then a resume that must stop
def test_a_nan_loss_term_stops_training_naming_the_term_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    overrides = tiny_run_overrides(out, 6, **{"train.ckpt_every": 2})
    assert _cli(overrides, "--stop-at-step", "2") == 0
    good = out / "checkpoint_00000002.pt"
    digest = _sha256(good)

    # The real path through the CLI: exit status 1 and the term and step on stderr.
    with monkeypatch.context() as patch:
        forwards = _poison_loss_term(patch, "code", at_step=4, resumed_from=2)
        assert _cli(overrides, "--resume") == 1
    assert forwards == [3, 4]
    error = capsys.readouterr().err
    assert "non-finite loss term 'code' at step 4" in error and str(good) in error

    # Step 3 ran and step 4 did not: no checkpoint after the bad step, the good one unchanged.
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_00000002.pt"]
    assert _sha256(good) == digest and not (out / "checkpoint_final.pt").exists()

    # Through the Python API the exception carries the details; the kept checkpoint still resumes.
    config = load_run_config("pretrain_emoji", overrides=overrides)
    with monkeypatch.context() as patch:
        _poison_loss_term(patch, "itm", at_step=3, resumed_from=2)
        with pytest.raises(NonFiniteLossError) as info:
            train(config, resume=True)
    assert (info.value.term, info.value.step, info.value.checkpoint) == ("itm", 3, good)
    result = train(load_run_config("pretrain_emoji", overrides=overrides), resume=True)
    assert result.finished and result.steps == 6


def test_a_fresh_run_refuses_to_mix_with_an_earlier_run_unless_told_to_overwrite(tmp_path, capsys):
    overrides = tiny_run_overrides(tmp_path / "run", 1)
    assert _cli(overrides) == 0
    assert _cli(overrides) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _cli(overrides + ["train.overwrite=true", "train.max_steps=2"]) == 0
    from codis_lib.metrics_log import read_jsonl

    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]  # the old log is gone


def test_a_resume_counts_a_key_an_older_checkpoint_lacks_as_its_default():
    from codis_lib.config import ModelConfig
    from codis_lib.train.resume import model_config_differences

    current = ModelConfig().to_dict()
    older = {key: value for key, value in current.items() if key not in ("align_columns", "teacher_view")}
    assert model_config_differences(older, current) == []  # written before those options existed
    changed = {**current, "align_columns": "student"}
    assert model_config_differences(older, changed) == ["align_columns: checkpoint 'teacher', now 'student'"]
    assert model_config_differences(current, {**current, "temp": 0.05}) == ["temp: checkpoint 0.07, now 0.05"]
