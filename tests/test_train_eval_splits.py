"""Evaluation on named splits: the end of training writes one eval_<split>.json per split, codis-eval --split."""
import contextlib
import io
import json
import shutil

import pytest
import torch

from codis_lib.checkpoint import load_checkpoint
from codis_lib.evaluation.cli import eval_main
from codis_lib.run_config import load_run_config
from codis_lib.train.cli import pretrain_main
from codis_lib.train.engine import train
from codis_lib.metrics_log import read_jsonl
from codis_lib.data.emoji_new_style import noto_font_path
from tests.helpers import tiny_run_overrides

# pretrain_emoji's train.eval.splits; the held-out style is skipped where the Noto font is missing
CONFIG_SPLITS = ["new_drawings", "new_style", "test"]
SPLITS = [s for s in CONFIG_SPLITS if s != "new_style" or noto_font_path() is not None]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny fusion calls lose from a 2nd thread


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, one_thread):
    """A 2-step codis-pretrain run on the small emoji corpus that evaluates at the end: (run folder, stdout)."""
    run_dir = tmp_path_factory.mktemp("splits_run")
    overrides = tiny_run_overrides(run_dir, 2, **{"train.eval.at_end": "true", "train.eval.k_test": 4,
                                                  "train.eval.batch_size": 32})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = pretrain_main([a for value in overrides for a in ("--set", value)])
    assert status == 0, printed.getvalue()[-2000:]
    return run_dir, printed.getvalue()


def test_the_end_of_training_evaluates_every_split_into_its_own_file_and_table(finished_run):
    run_dir, printed = finished_run
    assert load_run_config("pretrain_emoji", world_size=1).train.eval.splits == CONFIG_SPLITS
    reports = {split: json.loads((run_dir / f"eval_{split}.json").read_text()) for split in SPLITS}
    assert sorted(p.name for p in run_dir.glob("eval_*.json")) == sorted([f"eval_{s}.json" for s in SPLITS]
                                                                         + ["eval_words.json"])
    words = json.loads((run_dir / "eval_words.json").read_text())  # the everyday words on the known-concept galleries
    assert [w["gallery"] for w in words] == [s for s in SPLITS if s != "test"]
    assert all(0.0 <= w["hit_at_k"] <= 100.0 and w["words_scored"] > 0 for w in words)
    # the small corpus: 18 new drawings of training emoji (72 captions), 15 test images of unseen concepts (50)
    assert (reports["new_drawings"]["num_images"], reports["new_drawings"]["num_texts"]) == (18, 72)
    assert (reports["test"]["num_images"], reports["test"]["num_texts"]) == (15, 50)
    for report in reports.values():
        assert report["k"] == 4 and report["headline"] == report["metrics"]["itm"]
    # metrics.jsonl: one eval record per split, in the configured order, at the last step
    evals = read_jsonl(run_dir / "metrics.jsonl", kind="eval")
    assert [(r["split"], r["step"]) for r in evals] == [(s, 2) for s in SPLITS]
    assert evals[-1]["r_mean"] == reports["test"]["headline"]["r_mean"]
    # codis-pretrain prints one table per split, titled with the split and what it holds, in that order
    first = printed.index("Zero-shot retrieval on the new_drawings split (new drawings of training concepts)")
    second = printed.index("Zero-shot retrieval on the test split (concepts never seen in training)")
    assert first < second
    assert printed.count("this run, ITM re-ranked (k=4)") == len(SPLITS)
    assert "Everyday word queries" in printed and "hit@5" in printed


def test_codis_eval_scores_the_run_splits_by_default_or_the_named_ones(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    checkpoint = run_dir / "checkpoint_final.pt"
    common = ["--k", "4", "--pair-batch-size", "64", "--device", "cpu"]
    assert eval_main([str(checkpoint), *common, "--json", str(tmp_path / "all.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.index("new_drawings split of the checkpoint's run (new drawings of training concepts)") < \
        printed.index("test split of the checkpoint's run (concepts never seen in training)")
    by_split = json.loads((tmp_path / "all.json").read_text())
    assert list(by_split) == SPLITS  # keyed by split, in the run's order
    for split in SPLITS:  # the same numbers as the trainer's own evaluation at the end
        assert by_split[split]["metrics"] == json.loads((run_dir / f"eval_{split}.json").read_text())["metrics"]
    assert eval_main([str(checkpoint), *common, "--split", "test", "--split", "val", "--json",
                      str(tmp_path / "two.json")]) == 0
    named = json.loads((tmp_path / "two.json").read_text())
    assert list(named) == ["test", "val"] and named["test"]["metrics"] == by_split["test"]["metrics"]
    assert named["val"]["num_images"] == 8
    capsys.readouterr()
    assert eval_main([str(checkpoint), *common, "--split", "train"]) == 2
    assert "--split: 'train' is not an evaluation split of emoji data; valid: val, test, new_drawings" in \
        capsys.readouterr().err
    assert eval_main([str(checkpoint), *common, "--split", "test", "--annotation", str(tmp_path / "x.json")]) == 2
    assert "give one or the other" in capsys.readouterr().err


def test_a_checkpoint_that_stores_the_older_one_split_key_is_evaluated_on_that_split(finished_run, tmp_path):
    run_dir, _ = finished_run
    old_dir = tmp_path / "old_run"
    shutil.copytree(run_dir / "tokenizer", old_dir / "tokenizer")
    stored = load_checkpoint(run_dir / "checkpoint_final.pt")
    settings = stored["config"]["train"]["eval"]
    del settings["splits"]
    settings["split"] = "test"  # what checkpoints written before train.eval.splits hold
    torch.save(stored, old_dir / "checkpoint_final.pt")
    assert eval_main([str(old_dir / "checkpoint_final.pt"), "--k", "4", "--device", "cpu", "--json",
                      str(tmp_path / "old.json")]) == 0
    result = json.loads((tmp_path / "old.json").read_text())
    assert list(result) == ["test"]
    assert result["test"]["metrics"] == json.loads((run_dir / "eval_test.json").read_text())["metrics"]


def test_a_corpus_without_a_listed_split_stops_the_run_before_training(tmp_path):
    from tests.fixtures_data.corpus import small_emoji_corpus

    corpus, _ = small_emoji_corpus()
    older = tmp_path / "emoji_without_new_drawings"
    shutil.copytree(corpus, older)
    (older / "new_drawings.json").unlink()
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(run_dir, 2, **{"data.root": str(older), "train.eval.at_end": "true"})
    with pytest.raises(FileNotFoundError, match="new_drawings"):
        train(load_run_config("pretrain_emoji", overrides=overrides))
    assert not list(run_dir.glob("checkpoint_*.pt")) and not (run_dir / "metrics.jsonl").exists()
    # without the evaluation at the end the same corpus still trains
    overrides = tiny_run_overrides(run_dir, 1, **{"data.root": str(older)})
    assert train(load_run_config("pretrain_emoji", overrides=overrides)).finished
