"""Issue 25, the rest of the minor list: every command's argument errors are one line, a full disk at start
names the file and leaves no lock behind, SIGTERM is answered in every phase of a run, a link out of the image
root is caught, and a resume says when the image files changed."""
from __future__ import annotations

import pytest


def _one_line_exit_2(status: int, capsys) -> str:
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, (status, err)
    return err


# ---------------------------------------------------------------------------------------------- argparse
def _mains():
    from codis_lib.data.check import main as check_main
    from codis_lib.data.emoji_corpus import main as build_main
    from codis_lib.evaluation.cli import eval_main
    from codis_lib.train.cli import finetune_main, pretrain_main

    return {"codis-check-data": (check_main, ["x.json", "--workers", "abc"], "--workers"),
            "codis-build-emoji": (build_main, ["--limit", "x"], "--limit"),
            "codis-eval": (eval_main, ["--k", "abc"], "--k"),
            "codis-pretrain": (pretrain_main, ["--stop-at-step", "x"], "--stop-at-step"),
            "codis-finetune": (finetune_main, ["--bogus"], "--bogus")}


@pytest.mark.parametrize("prog", ["codis-check-data", "codis-build-emoji", "codis-eval", "codis-pretrain",
                                  "codis-finetune"])
def test_a_bad_argument_is_one_line_naming_it_with_exit_2(prog, capsys):
    main, argv, argument = _mains()[prog]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = _one_line_exit_2(stopped.value.code, capsys)
    assert err.startswith(f"{prog}: error: ") and argument in err and "usage:" not in err


def test_a_missing_positional_argument_is_one_line_too(capsys):
    from codis_lib.data.check import main as check_main

    with pytest.raises(SystemExit) as stopped:
        check_main([])
    assert "annotation" in _one_line_exit_2(stopped.value.code, capsys)


# ---------------------------------------------------------------------------------------------- SIGTERM
def _terminate_self_then(function):
    """Return `function` wrapped to send this process SIGTERM first (the handler of the phase answers it)."""
    import os
    import signal

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)

    return wrapped


def _pretrain(overrides, *flags) -> int:
    from codis_lib.train.cli import pretrain_main

    return pretrain_main([item for value in overrides for item in ("--set", value)] + list(flags))


def test_sigterm_before_the_trainer_starts_is_one_line_and_exit_143(tmp_path, capsys, monkeypatch):
    import codis_lib.run_config as run_config
    from tests.helpers import tiny_run_overrides

    monkeypatch.setattr(run_config, "load_run_config", _terminate_self_then(run_config.load_run_config))
    assert _pretrain(tiny_run_overrides(tmp_path / "run", 2)) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SIGTERM before the first training step" in err
    assert not (tmp_path / "run").exists()


def test_sigterm_during_setup_stops_at_once_and_releases_the_lock(tmp_path, capsys, monkeypatch):
    import codis_lib.train.engine as engine
    from tests.helpers import tiny_run_overrides

    monkeypatch.setattr(engine, "build_training_run", _terminate_self_then(engine.build_training_run))
    assert _pretrain(tiny_run_overrides(tmp_path / "run", 2)) == 143
    err = capsys.readouterr().err
    assert "SIGTERM before the first training step" in err.splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no lock, no checkpoint


def test_sigterm_during_the_final_evaluation_skips_it_and_says_the_checkpoint_is_saved(tmp_path, capsys,
                                                                                        monkeypatch):
    import codis_lib.train.engine as engine
    from codis_lib.checkpoint import load_checkpoint
    from tests.helpers import tiny_run_overrides

    monkeypatch.setattr(engine, "_report_eval_split", _terminate_self_then(engine._report_eval_split))
    out = tmp_path / "run"
    assert _pretrain(tiny_run_overrides(out, 2, **{"train.eval.at_end": "true"})) == 143
    last = capsys.readouterr().err.splitlines()[-1]
    final = out / "checkpoint_final.pt"
    assert "SIGTERM during the final evaluation" in last and str(final) in last and "skipped" in last
    assert load_checkpoint(final)["step"] == 2
    assert not list(out.glob("eval_*.json")) and not (out / ".run.lock").exists()


def test_sigterm_in_training_still_stops_politely_at_the_step_boundary(tmp_path, capsys, monkeypatch):
    import codis_lib.train.engine as engine
    from codis_lib.checkpoint import list_checkpoints, load_checkpoint
    from tests.helpers import tiny_run_overrides

    monkeypatch.setattr(engine, "train_step", _terminate_self_then(engine.train_step))
    out = tmp_path / "run"
    assert _pretrain(tiny_run_overrides(out, 4)) == 0
    captured = capsys.readouterr()
    assert "stopped on SIGTERM after step 1, checkpoint saved" in captured.out
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(out)] == [1]


# ---------------------------------------------------------------------------------------------- a full disk at start
def test_a_full_disk_at_start_names_the_lock_file_and_leaves_no_empty_lock(tmp_path, capsys, monkeypatch):
    import errno
    import os

    import codis_lib.train.lock as lock_module
    from tests.helpers import tiny_run_overrides

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock_module.os, "pwrite", full)
    out = tmp_path / "run"
    err = _one_line_exit_2(_pretrain(tiny_run_overrides(out, 1)), capsys)
    assert str(out / ".run.lock") in err and "No space left on device" in err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------- links out of the root
@pytest.fixture()
def linked_out(tmp_path):
    """A corpus folder whose file imgs/link.png and folder imgs/outdir are links to images outside it."""
    import json
    import shutil

    from tests.fixtures_data.corpus import small_emoji_corpus

    root, _ = small_emoji_corpus()
    sources = sorted((root / "images").rglob("*.png"))[:6]
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    (corpus / "imgs").mkdir(parents=True)
    outside.mkdir()
    for index, source in enumerate(sources[:5]):
        shutil.copyfile(source, corpus / "imgs" / f"{index}.png")
    shutil.copyfile(sources[5], outside / "private.png")
    (corpus / "imgs" / "link.png").symlink_to(outside / "private.png")
    (corpus / "imgs" / "outdir").symlink_to(outside)
    records = [{"image": f"imgs/{i}.png", "caption": f"emoji number {i}"} for i in range(5)]
    records += [{"image": "imgs/link.png", "caption": "a file linked out"},
                {"image": "imgs/outdir/private.png", "caption": "through a linked folder"},
                {"image": "imgs/../imgs/0.png", "caption": "dot dot that stays inside"}]
    (corpus / "ann.json").write_text(json.dumps(records))
    return corpus


def test_check_data_drops_an_image_that_a_link_leads_out_of_the_root(linked_out, tmp_path):
    from codis_lib.data.check import check_annotations

    result = check_annotations(linked_out / "ann.json", out=tmp_path / "clean.json", cache=False, progress=False)
    dropped = {r["index"]: r for r in result.report["dropped_records"]}
    assert sorted(dropped) == [5, 6] and {r["reason"] for r in dropped.values()} == {"outside_root"}
    assert "leads through a link to" in dropped[5]["problem"] and "private.png" in dropped[5]["problem"]
    assert result.report["kept"] == 6  # '..' staying inside the root is kept


def test_check_data_keeps_a_root_that_is_itself_a_link(linked_out, tmp_path):
    from codis_lib.data.check import check_annotations

    alias = tmp_path / "alias"
    alias.symlink_to(linked_out)
    result = check_annotations(alias / "ann.json", out=tmp_path / "clean.json", cache=False, progress=False)
    assert result.report["counts"]["outside_root"] == 2 and result.report["kept"] == 6


def test_training_readers_warn_about_links_out_of_the_root_or_refuse_them(linked_out, caplog):
    from codis_lib.data.albef_json import AnnotationError, read_pretrain_annotations

    with caplog.at_level("WARNING"):
        result = read_pretrain_annotations(linked_out / "ann.json")
    assert len(result.records) == 8
    assert any("2 record(s) name an image outside the image root" in m for m in caplog.messages)
    with pytest.raises(AnnotationError, match="record 5.*leads through a link to"):
        read_pretrain_annotations(linked_out / "ann.json", outside_root="raise")


# ---------------------------------------------------------------------------------------------- changed images
def test_resume_names_an_image_file_that_changed_since_the_checkpoint(tmp_path, capsys):
    import json
    import os
    import shutil

    from tests.fixtures_data.corpus import small_emoji_corpus
    from tests.helpers import tiny_run_overrides

    corpus = tmp_path / "corpus"
    shutil.copytree(small_emoji_corpus()[0], corpus)
    out = tmp_path / "run"
    overrides = tiny_run_overrides(out, 3, **{"data.root": corpus})
    assert _pretrain(overrides, "--stop-at-step", "1") == 0
    assert (out / "image_files.npy").is_file()
    assert _pretrain(overrides, "--resume", "--stop-at-step", "2") == 0  # nothing changed: nothing said
    assert "image files changed" not in capsys.readouterr().err
    image = corpus / json.loads((corpus / "pretrain.json").read_text())[5]["image"]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert _pretrain(overrides, "--resume") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "image files changed" in line]
    assert len(warnings) == 1 and str(image) in warnings[0] and "checkpoint_00000002.pt" in warnings[0]
    assert warnings[0].startswith("[codis] WARNING: 1 of ")


# ---------------------------------------------------------------------------------------------- round-3 probes
def test_an_empty_output_dir_is_refused_not_the_current_folder(tmp_path, capsys, monkeypatch):
    from tests.helpers import tiny_run_overrides

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine: 1\n")
    overrides = [o for o in tiny_run_overrides(tmp_path / "unused", 1) if not o.startswith("train.output_dir=")]
    assert _pretrain(overrides + ["train.output_dir=", "train.overwrite=true"]) == 2
    err = capsys.readouterr().err
    assert "train.output_dir: is empty" in err and "must be > 0" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "mine: 1\n"


def test_the_corpus_folder_as_run_folder_is_refused_and_left_unchanged(tmp_path, capsys):
    import hashlib
    import shutil

    from tests.fixtures_data.corpus import small_emoji_corpus
    from tests.helpers import tiny_run_overrides

    corpus = tmp_path / "corpus"
    shutil.copytree(small_emoji_corpus()[0], corpus)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in corpus.rglob("*") if p.is_file()}
    err = _one_line_exit_2(_pretrain(tiny_run_overrides(corpus, 1, **{"data.root": corpus})), capsys)
    assert "train.output_dir" in err and "is data.root" in err
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in corpus.rglob("*") if p.is_file()} == before


def test_a_users_tokenizer_folder_in_the_run_folder_is_not_written_into(tmp_path, capsys):
    from tests.helpers import tiny_run_overrides

    out = tmp_path / "mine"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{\"mine\": true}")
    err = _one_line_exit_2(_pretrain(tiny_run_overrides(out, 1)), capsys)
    assert "tokenizer" in err and "train.overwrite=true" in err
    assert (out / "tokenizer" / "tokenizer.json").read_text() == "{\"mine\": true}"
    assert _pretrain(tiny_run_overrides(out, 1, **{"train.overwrite": "true"})) == 0  # told to: replaced
    assert "mine" not in (out / "tokenizer" / "tokenizer.json").read_text()


def test_a_disk_too_full_for_one_checkpoint_is_refused_before_training_and_a_rerun_is_not_blocked(tmp_path, capsys,
                                                                                                  monkeypatch):
    import collections
    import shutil

    from tests.helpers import tiny_run_overrides

    usage = collections.namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 9 * 2**20, 2**20))
    out = tmp_path / "run"
    err = _one_line_exit_2(_pretrain(tiny_run_overrides(out, 2)), capsys)
    assert str(out) in err and "1.0 MiB free" in err and "a checkpoint of this model needs about" in err
    assert not list(out.glob("checkpoint_*")) and not (out / "metrics.jsonl").exists()
    monkeypatch.setattr(shutil, "disk_usage", real)  # space freed: the same command runs
    assert _pretrain(tiny_run_overrides(out, 2)) == 0


def test_ctrl_c_during_training_is_one_line_naming_the_latest_checkpoint(tmp_path, capsys, monkeypatch):
    import codis_lib.train.engine as engine
    from tests.helpers import tiny_run_overrides

    calls = []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    real_step = engine.train_step
    monkeypatch.setattr(engine, "train_step", step_then_interrupt)
    out = tmp_path / "run"
    assert _pretrain(tiny_run_overrides(out, 6, **{"train.ckpt_every": 2})) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted (Ctrl-C)" in err and str(out / "checkpoint_00000002.pt") in err
    assert not (out / ".run.lock").exists()


# ---------------------------------------------------------------------------------------------- codis-eval --json
@pytest.mark.parametrize("target", ["checkpoint", "config.yaml", "tokenizer/tokenizer.json", "link"])
def test_codis_eval_json_never_overwrites_what_it_reads(target, tmp_path, capsys):
    import hashlib

    from codis_lib.evaluation.cli import eval_main
    from tests.helpers import tiny_run_overrides

    out = tmp_path / "run"
    assert _pretrain(tiny_run_overrides(out, 1)) == 0
    capsys.readouterr()
    checkpoint = out / "checkpoint_final.pt"
    if target == "link":
        (tmp_path / "result.json").symlink_to(checkpoint)
        json_path = tmp_path / "result.json"
    else:
        json_path = checkpoint if target == "checkpoint" else out / target
    before = hashlib.sha256(json_path.read_bytes()).hexdigest()
    err = _one_line_exit_2(eval_main([str(checkpoint), "--split", "test", "--json", str(json_path)]), capsys)
    assert "--json" in err and "overwritten" in err
    assert hashlib.sha256(json_path.read_bytes()).hexdigest() == before


def test_a_python_tag_in_a_set_value_is_one_line_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    status = _pretrain([f'train.seed=!!python/object/apply:os.system ["touch {marker}"]'])
    err = _one_line_exit_2(status, capsys)
    assert "train.seed" in err and "not valid YAML at line 1" in err and not marker.exists()


def test_a_raw_pickle_as_init_from_is_one_line_without_torchs_warning(tmp_path, capsys, recwarn):
    import os
    import pickle

    from tests.helpers import tiny_run_overrides

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Evil()}, protocol=4))
    status = _pretrain(tiny_run_overrides(tmp_path / "run", 1, **{"train.init_from": evil}))
    err = _one_line_exit_2(status, capsys)
    assert str(evil) in err and not marker.exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # printed on stderr outside pytest
