"""The training commands' guards: no update or checkpoint from non-finite state, resume checks, one error path."""
from __future__ import annotations

import shutil

import pytest
import torch

from codis_lib.checkpoint import list_checkpoints, load_checkpoint
from codis_lib.train.cli import pretrain_main
from tests.helpers import tiny_run_overrides


def _cli(overrides, *flags):
    argv = [item for value in overrides for item in ("--set", value)]
    return pretrain_main(argv + list(flags))


def _non_finite(checkpoint: dict) -> list[str]:
    return [k for k, v in checkpoint["model"].items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]


# ------------------------------------------------------------------------------------------ case 1
def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_update_and_is_never_saved(tmp_path, capsys):
    """issue case 1: lr=1e5 gives finite losses but NaN gradients; the run stops (exit 1) before applying them."""
    out = tmp_path / "run"
    overrides = tiny_run_overrides(out, 8, **{"train.optimizer.lr": "1e5", "train.optimizer.warmup_steps": 30,
                                              "train.ckpt_every": 1})
    assert _cli(overrides) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "non-finite gradient at step 2" in error
    assert "visual_encoder." in error and "before the update" in error
    from codis_lib.metrics_log import read_jsonl

    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_jsonl(out / "metrics.jsonl"))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_00000001.pt"]  # the good one, named in the error
    assert str(out / "checkpoint_00000001.pt") in error
    assert _non_finite(load_checkpoint(out / "checkpoint_00000001.pt")) == []


def test_a_poisoned_gradient_is_named_with_its_parameter_and_step(tmp_path, monkeypatch):
    """issue case 1: the guard names the step and the parameter whose gradient is NaN (loss finite)."""
    from codis_lib.model.codis import CODIS
    from codis_lib.run_config import load_run_config
    from codis_lib.train.engine import train
    from codis_lib.train.guards import NonFiniteGradientError

    original, forwards = CODIS.forward, []

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        forwards.append(1)
        if len(forwards) == 2:
            self.vision_proj.weight.register_hook(lambda grad: grad * float("nan"))
        return output

    monkeypatch.setattr(CODIS, "forward", forward)
    config = load_run_config("pretrain_emoji", overrides=tiny_run_overrides(tmp_path / "run", 3))
    with pytest.raises(NonFiniteGradientError) as info:
        train(config)
    assert info.value.step == 2 and info.value.names == ["vision_proj.weight"]
    assert "non-finite gradient at step 2" in str(info.value) and list_checkpoints(tmp_path / "run") == []


def test_no_checkpoint_is_written_from_a_non_finite_state(tmp_path):
    """issue case 1: save_checkpoint checks parameters, buffers and optimizer state first and writes nothing."""
    from codis_lib.train.guards import NonFiniteStateError
    from codis_lib.train.run_dir import save_checkpoint
    from codis_lib.train.process import RunContext

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    ctx = RunContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_process_group=False)
    kwargs = dict(model=model, optimizer=optimizer, schedule=None, scaler=None, epoch=0, step_in_epoch=1,
                  saved_config={}, keep_last=0)
    good = save_checkpoint(ctx, tmp_path, step=1, **kwargs)
    model[1].running_var[0] = float("inf")  # a buffer, not a parameter
    optimizer.state[model[0].weight]["exp_avg_sq"][0, 0] = float("nan")
    with pytest.raises(NonFiniteStateError) as info:
        save_checkpoint(ctx, tmp_path, step=2, **kwargs)
    assert info.value.names == ["1.running_var", "optimizer[0.weight].exp_avg_sq"]
    assert "checkpoint_00000002.pt was not written" in str(info.value) and str(good) in str(info.value)
    assert list_checkpoints(tmp_path) == [good]


def test_the_fp16_loss_scale_guard_stops_when_the_scale_falls_below_one():
    """issue case 1: with a grad scaler, overflowing steps are skipped; a scale below 1 stops the run."""
    from codis_lib.train.guards import NonFiniteGradientError, check_loss_scale

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = model.weight.detach().clone()
    scales = []
    with pytest.raises(NonFiniteGradientError) as info:
        for step in range(1, 6):
            scaler.scale(model(torch.ones(1, 2)).sum() * float("inf")).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            scales.append(scaler.get_scale())
            check_loss_scale(scaler.get_scale(), step=step, epoch=0, lr=0.1, checkpoint=None)
    assert scales == [2.0, 1.0, 0.5] and info.value.step == 3 and "loss scale 0.5" in str(info.value)
    assert torch.equal(model.weight, before)  # no overflowing update was applied
    for scale in (float("inf"), float("nan")):
        with pytest.raises(NonFiniteGradientError):
            check_loss_scale(scale, step=1, epoch=0, lr=0.1, checkpoint=None)


# ------------------------------------------------------------------------------------------ case 2
def _copied_corpus(tmp_path):
    """Return a copy of the small emoji corpus (symlinked images) whose files a test may change."""
    import shutil

    from tests.fixtures_data.corpus import small_emoji_corpus

    root, _ = small_emoji_corpus()
    copy = tmp_path / "corpus"
    shutil.copytree(root, copy, symlinks=True)
    return copy


def test_resume_refuses_a_changed_batch_seed_lr_or_dataset_and_keeps_config_yaml(tmp_path, capsys):
    """issue case 2: the checkpoint records what the data order depends on; --resume refuses a change in one line."""
    out = tmp_path / "run"
    overrides = tiny_run_overrides(out, 4)
    assert _cli(overrides, "--stop-at-step", "1") == 0
    config_yaml = (out / "config.yaml").read_bytes()
    capsys.readouterr()

    changed = overrides + ["train.batch_size=4", "train.seed=7", "train.optimizer.lr=3e-4"]
    assert _cli(changed, "--resume") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    for change in ("global batch (train.batch_size x processes) 8 -> 4", "train.seed 42 -> 7",
                   "schedule lr 0.001 -> 0.0003", f"train.init_from={out / 'checkpoint_00000001.pt'}"):
        assert change in error
    assert (out / "config.yaml").read_bytes() == config_yaml  # the refused resume wrote nothing

    corpus = _copied_corpus(tmp_path)  # another data root: the same corpus with one record less
    import json

    records = json.loads((corpus / "pretrain.json").read_text())
    (corpus / "pretrain.json").write_text(json.dumps(records[:-1]))
    assert _cli(overrides + [f"data.root={corpus}"], "--resume") == 2
    error = capsys.readouterr().err
    assert f"training records {len(records)} -> {len(records) - 1}" in error and "training files" in error

    assert _cli(overrides + ["train.max_steps=6"], "--resume") == 2  # another schedule length
    assert "schedule total_steps 4 -> 6" in capsys.readouterr().err
    assert (out / "config.yaml").read_bytes() == config_yaml


def test_an_older_checkpoint_without_the_record_resumes_with_one_warning(tmp_path, capsys):
    """issue case 2: checkpoints written before the data-order record still resume, after one warning."""
    out = tmp_path / "run"
    overrides = tiny_run_overrides(out, 2)
    assert _cli(overrides, "--stop-at-step", "1") == 0
    path = out / "checkpoint_00000001.pt"
    checkpoint = load_checkpoint(path)
    assert checkpoint["data_order"]["global_batch"] == 8 and checkpoint["data_order"]["records"] > 0
    del checkpoint["data_order"]
    torch.save(checkpoint, path)
    capsys.readouterr()
    assert _cli(overrides, "--resume") == 0
    assert capsys.readouterr().out.count("does not record its data order") == 1
    assert load_checkpoint(out / "checkpoint_final.pt")["step"] == 2


# ------------------------------------------------------------------------------------------ case 11
def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    return error


def test_unreadable_resume_files_are_named_and_the_intact_earlier_checkpoint_is_offered(tmp_path, capsys):
    """A truncated checkpoint named with --resume PATH is one line, exit 2, naming it and the earlier intact one;
    a plain --resume passes over a truncated latest checkpoint to the newest intact one, saying so in one line."""
    out = tmp_path / "run"
    overrides = tiny_run_overrides(out, 4, **{"train.ckpt_every": 1, "train.keep_last": 0})
    assert _cli(overrides, "--stop-at-step", "2") == 0
    first, second = list_checkpoints(out)
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])  # truncated
    capsys.readouterr()
    assert _cli(overrides, "--resume", str(second)) == 2
    error = _one_line_error(capsys)
    assert f"{second}: not a checkpoint archive" in error
    assert f"the latest intact earlier checkpoint is {first} (resume from it with --resume {first})" in error
    fallback_run = tmp_path / "fallback"
    shutil.copytree(out, fallback_run)
    moved = [o.replace(str(out), str(fallback_run)) for o in overrides]
    assert _cli(moved, "--resume", "--stop-at-step", "2") == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "newest intact checkpoint" in line]
    assert len(said) == 1 and "not a checkpoint archive" in said[0]
    assert f"resuming from the newest intact checkpoint {fallback_run / first.name} instead" in said[0]
    assert load_checkpoint(fallback_run / second.name)["step"] == 2  # the truncated file replaced by a good one
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert _cli(overrides, "--resume", str(text)) == 2
    error = _one_line_error(capsys)
    assert str(text) in error and "weights_only" not in error
    assert _cli(overrides, "--resume", str(first)) == 0  # the offered one resumes


def test_bad_values_and_inputs_are_one_line_with_exit_2(tmp_path, capsys):
    """issue case 11: lr=.inf, cuda without a GPU, a batch larger than the data, non-UTF-8 JSON: one line, exit 2."""
    out = tmp_path / "run"
    assert _cli(tiny_run_overrides(out, 2, **{"train.optimizer.lr": ".inf"})) == 2
    assert "train.optimizer.lr: must be a finite number, got inf" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _cli(tiny_run_overrides(out, 2, **{"train.device": "cuda"})) == 2
        assert "train.device: 'cuda', but no CUDA device is visible" in _one_line_error(capsys)
    assert _cli(tiny_run_overrides(out, 2, **{"train.batch_size": 200, "model.queue_size": 200})) == 2
    error = _one_line_error(capsys)
    assert "train.batch_size" in error and "smaller than one optimizer step" in error and "pretrain.json" in error
    corpus = _copied_corpus(tmp_path)
    (corpus / "pretrain.json").write_bytes('[{"image": "caf\u00e9.png", "caption": "x"}]'.encode("latin-1"))
    assert _cli(tiny_run_overrides(out, 2, **{"data.root": str(corpus)})) == 2
    error = _one_line_error(capsys)
    assert str(corpus / "pretrain.json") in error and "UTF-8" in error


def test_unwritable_output_folders_and_a_full_disk_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    """issue case 11: an output folder that cannot be created, and a full disk on save: one line, exit 2."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _cli(tiny_run_overrides(blocker / "run", 1)) == 2
    assert str(blocker) in _one_line_error(capsys)

    import codis_lib.checkpoint as checkpoint_module

    def full_disk(obj, handle):
        handle.write(b"partial bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    assert _cli(tiny_run_overrides(out, 1)) == 2
    error = _one_line_error(capsys)
    assert f"could not write checkpoint {out / 'checkpoint_00000001.pt'}: the write failed (a full disk?)" in error
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary file, no lock left
