"""Guards on codis-eval's inputs: the tokenizer against the checkpoint, duplicate image records, k larger than
the candidates, and bad input (an unwritable --json, a damaged checkpoint) as one line with exit status 2."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from codis_lib.data.albef_json import AnnotationError
from codis_lib.data.datasets import RetrievalEvalDataset
from codis_lib.data.tokenizer import load_tokenizer, train_wordpiece
from codis_lib.evaluation import cli
from codis_lib.evaluation.cli import eval_main
from codis_lib.evaluation.report import format_evaluation_table
from codis_lib.run_config import load_run_config
from codis_lib.train.engine import train
from tests.fixtures_data.corpus import SMALL_CORPUS_SIZE, small_emoji_corpus
from tests.helpers import tiny_run_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny fusion calls lose from a 2nd thread
PROTOCOL = ["--pair-batch-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    """The folder of a 1-step tiny CODIS run on the small emoji corpus, saved by the real trainer."""
    out = tmp_path_factory.mktemp("run")
    train(load_run_config("pretrain_emoji", overrides=tiny_run_overrides(out, 1)))
    return out


def _copy_run(run_dir, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy2(run_dir / "checkpoint_final.pt", copy / "checkpoint_final.pt")
    shutil.copytree(run_dir / "tokenizer", copy / "tokenizer")
    return copy


def _small_tokenizer(folder):
    """Save a tokenizer with far fewer pieces than the run's, in the same special-token layout."""
    train_wordpiece(["a giraffe", "a red heart", "thumbs up"], 200, folder)
    return folder


# ------------------------------------------------------------------------------------------------ case 5
def test_a_tokenizer_that_does_not_match_the_checkpoint_is_refused(run_dir, tmp_path, capsys):
    """issue case 5: a smaller or larger tokenizer beside the checkpoint: one line naming both sizes, exit 2."""
    corpus, _ = small_emoji_corpus()
    expected = len(load_tokenizer(run_dir / "tokenizer"))
    copy = _copy_run(run_dir, tmp_path)
    shutil.rmtree(copy / "tokenizer")
    small = len(load_tokenizer(_small_tokenizer(copy / "tokenizer")))
    assert small < expected
    argv = [str(copy / "checkpoint_final.pt"), "--annotation", str(corpus / "test.json"), "--k", "4"] + PROTOCOL
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"has {small} tokens" in err and f"embeds {expected}" in err and str(copy / "tokenizer") in err
    # larger: the run's tokenizer with extra pieces (it used to fail with an IndexError deep in the model)
    larger = load_tokenizer(run_dir / "tokenizer")
    larger.add_tokens(["zzzextra1", "zzzextra2"])
    shutil.rmtree(copy / "tokenizer")
    larger.save_pretrained(str(copy / "tokenizer"))
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"has {expected + 2} tokens" in err and f"embeds {expected}" in err and len(err.splitlines()) == 1


def test_tokenizer_option_for_our_checkpoint_is_used_and_checked(run_dir, tmp_path, capsys):
    """issue case 5: --tokenizer with our checkpoint is used instead of the run folder's copy (and checked), not ignored."""
    corpus, _ = small_emoji_corpus()
    own = tmp_path / "own_tokenizer"
    shutil.copytree(run_dir / "tokenizer", own)
    copy = tmp_path / "bare"
    copy.mkdir()
    shutil.copy2(run_dir / "checkpoint_final.pt", copy / "checkpoint_final.pt")  # no tokenizer beside it
    out = tmp_path / "eval.json"
    argv = [str(copy / "checkpoint_final.pt"), "--annotation", str(corpus / "test.json"), "--k", "4",
            "--rerank", "no", "--json", str(out)] + PROTOCOL
    assert eval_main(argv + ["--tokenizer", str(own)]) == 0
    assert f"tokenizer {own}" in json.loads(out.read_text())["model"]
    assert eval_main(argv + ["--tokenizer", str(_small_tokenizer(tmp_path / "small"))]) == 2
    assert str(tmp_path / "small") in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ case 6
def _with_duplicates(tmp_path, copies: int = 2):
    """Return a copy of the small corpus's test.json whose first record's image is listed again, with a new caption."""
    corpus, _ = small_emoji_corpus()
    records = json.loads((corpus / "test.json").read_text())
    image = str(corpus / records[0]["image"])
    records = [dict(r, image=str(corpus / r["image"])) for r in records]
    extra = [{"image": image, "caption": records[0]["caption"][:1] + [f"another caption {n}"]} for n in range(copies)]
    path = tmp_path / "dupes.json"
    path.write_text(json.dumps(records + extra))
    return path, records


def test_duplicate_image_records_are_merged_with_a_count(tmp_path, caplog):
    """issue case 6: an image listed twice is evaluated once with all its captions; a warning gives the count."""
    path, records = _with_duplicates(tmp_path)
    with caplog.at_level(logging.WARNING):
        dataset = RetrievalEvalDataset(path, image_root=tmp_path, image_size=SMALL_CORPUS_SIZE, check_images="none",
                                       outside_root="allow")
    assert len(dataset) == len(records) and dataset.merged_duplicates == 2
    assert "merged 2 duplicate image record(s)" in caplog.text
    first = dataset.records[0].captions
    assert first[-2:] == ("another caption 0", "another caption 1") and len(first) == len(records[0]["caption"]) + 2
    assert len(dataset.texts) == sum(len(r["caption"]) for r in records) + 2
    with pytest.raises(AnnotationError, match="2 duplicate image record"):
        RetrievalEvalDataset(path, image_root=tmp_path, check_images="none", outside_root="allow", duplicates="raise")


def test_codis_eval_on_duplicates_reports_the_merge(run_dir, tmp_path, capsys):
    """issue case 6: codis-eval on a file with a duplicated image: the same image count as without, merge reported."""
    path, records = _with_duplicates(tmp_path, copies=1)
    out = tmp_path / "eval.json"
    assert eval_main([str(run_dir / "checkpoint_final.pt"), "--annotation", str(path), "--k", "4", "--rerank", "no",
                      "--json", str(out)] + PROTOCOL) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == len(records) and result["merged_duplicates"] == 1
    assert "1 duplicate image record(s) merged" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ case 7
def test_k_larger_than_the_images_is_reported_per_direction(run_dir, tmp_path, capsys):
    """issue case 7: --k above the number of images: TR uses min(k, captions), IR min(k, images); both reported."""
    corpus, _ = small_emoji_corpus()
    out = tmp_path / "eval.json"
    assert eval_main([str(run_dir / "checkpoint_final.pt"), "--annotation", str(corpus / "test.json"), "--k", "20",
                      "--json", str(out)] + PROTOCOL) == 0
    result = json.loads(out.read_text())
    images, texts = result["num_images"], result["num_texts"]
    assert images < 20 < texts
    assert result["k_text_retrieval"] == 20 and result["k_image_retrieval"] == images
    assert result["k_requested"] == 20 and result["k"] == 20
    assert result["pairs_requested"] == images * 20 + texts * images
    assert f"this run, ITM re-ranked (k=20 TR, {images} IR)" in capsys.readouterr().out
    same = dict(result, k_text_retrieval=4, k_image_retrieval=4, k=4)
    assert "ITM re-ranked (k=4)" in format_evaluation_table(same)


# ------------------------------------------------------------------------------------------------ case 11
def test_unwritable_json_is_refused_before_the_evaluation(run_dir, tmp_path, capsys, monkeypatch):
    """issue case 11: --json to an unwritable path: one line, exit 2, before any evaluation runs."""
    def must_not_run(_args):
        raise AssertionError("the evaluation ran before --json was checked")

    monkeypatch.setattr(cli, "_evaluations", must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for target in (blocker / "eval.json", tmp_path):  # a file where a folder is needed; a folder itself
        assert eval_main([str(run_dir / "checkpoint_final.pt"), "--json", str(target)] + PROTOCOL) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"codis-eval: --json {target}: cannot write there")


def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    """issue case 11: a truncated or non-checkpoint file: one line naming it, exit 2, no weights_only advice."""
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    for path in (text, junk):
        assert eval_main([str(path)] + PROTOCOL) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "weights_only" not in err
