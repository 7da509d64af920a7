"""The poster's evaluation protocol: the table, its copy in docs/evaluation.md, and codis-eval's check against it.

The ALBEF checkpoints are the albef_tiny fixture's pretraining state dict and the retrieval layout made
from it (as tests/test_model_albef_fixture.py does), saved in tmp_path as ALBEF saves them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codis_lib.evaluation.cli import eval_main
from codis_lib.evaluation.paper import PAPER_RESULTS
from codis_lib.evaluation.protocol import (PROTOCOL, TABLE_BEGIN, TABLE_END, CheckpointKind,
                                           checkpoint_kind_of_albef, checkpoint_kind_of_ours, protocol_issues,
                                           protocol_markdown, protocol_row)
from codis_lib.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "albef_tiny" / "albef_tiny.pt"


@pytest.fixture(scope="module")
def albef_state() -> dict:
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)["state_dict"]


def retrieval_layout(state: dict) -> dict:
    """ALBEF's retrieval model: a BertModel as text_encoder.* (no MLM head), plus idx_queue."""
    out = {}
    for key, value in state.items():
        if ".cls." in key:
            continue
        out[key.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m.")] \
            = value.clone()
    out["idx_queue"] = torch.arange(64).reshape(1, 64)
    return out


@pytest.fixture()
def pretrained_file(tmp_path, albef_state) -> Path:
    path = tmp_path / "ALBEF_4M.pth"
    torch.save({"model": {k: v.clone() for k, v in albef_state.items()}}, path)
    return path


def messages(issues) -> list[str]:
    return [issue.message for issue in issues]


def test_table_has_every_poster_row_with_albef_protocol():
    cells = {(s, d, m) for s, datasets in PAPER_RESULTS.items() for d, methods in datasets.items() for m in methods}
    assert {(row.setting, row.dataset, row.method) for row in PROTOCOL} == cells and len(PROTOCOL) == 8
    for row in PROTOCOL:
        assert row.expected == PAPER_RESULTS[row.setting][row.dataset][row.method]
        assert row.k_test == {"coco": 256, "flickr": 128}[row.dataset]
        assert row.split_file == {"coco": "coco_test.json", "flickr": "flickr30k_test.json"}[row.dataset]
        assert (row.image_size == 256) == (row.checkpoint == "pretrained")
    assert protocol_row("zero-shot", "flickr").checkpoint == "coco-fine-tuned"  # ALBEF's zero-shot Flickr column
    assert protocol_row("zero-shot", "coco").checkpoint == "pretrained"
    assert protocol_row("fine-tuned", "flickr").checkpoint == "flickr-fine-tuned"
    # the packaged configs say the same resolutions and k as the table
    for name, row in (("finetune_coco", protocol_row("fine-tuned", "coco")),
                      ("finetune_flickr", protocol_row("fine-tuned", "flickr")),
                      ("pretrain_4m", protocol_row("zero-shot", "coco"))):
        config = load_run_config(name)
        assert config.model.vision.image_size == row.image_size, name
        assert config.train.eval.k_test == row.k_test, name
        assert Path(config.data.test_file).name == row.split_file, name
    with pytest.raises(ValueError, match="--setting 'linear'"):
        protocol_row("linear", "coco")


def test_docs_table_is_the_rendered_one():
    page = (ROOT / "docs" / "evaluation.md").read_text()
    assert TABLE_BEGIN in page and TABLE_END in page, "docs/evaluation.md lost the protocol table's markers"
    copy = page.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    assert copy == protocol_markdown(), ("docs/evaluation.md's protocol table differs from protocol_markdown(); "
                                         "paste the output of `python -m codis_lib.evaluation.protocol`")


def test_albef_layouts_tell_the_checkpoint_kind(tmp_path, albef_state, pretrained_file):
    assert checkpoint_kind_of_albef(pretrained_file).stage == "pretrained"
    retrieval = retrieval_layout(albef_state)
    unnamed = tmp_path / "checkpoint_best.pth"
    torch.save({"model": retrieval}, unnamed)
    kind = checkpoint_kind_of_albef(unnamed)
    assert (kind.stage, kind.dataset) == ("fine-tuned", None)
    named = tmp_path / "mscoco.pth"
    torch.save({"model": retrieval}, named)
    assert checkpoint_kind_of_albef(named).dataset == "coco"
    with_config = {"model": retrieval, "config": {"train_file": ["data/flickr30k_train.json"], "image_res": 384}}
    assert checkpoint_kind_of_albef(with_config).dataset == "flickr"
    export = tmp_path / "ours.pth"
    torch.save({"model": albef_state}, export)
    (tmp_path / "ours.config.json").write_text("{}")
    assert checkpoint_kind_of_albef(export).stage is None  # an export of ours: the layout says nothing


def test_pretrained_checkpoint_in_flickr_zero_shot_row_is_flagged(pretrained_file):
    kind = checkpoint_kind_of_albef(pretrained_file)
    issues = protocol_issues("zero-shot", "flickr", kind=kind, image_size=384, k=128,
                             split_file="data/flickr30k_test.json")
    assert [issue.severity for issue in issues] == ["mismatch"]
    assert issues[0].message.startswith("a pretrained checkpoint in the Flickr30K zero-shot row: the paper uses the "
                                        "model fine-tuned on COCO")


def test_384_px_on_a_pretrained_checkpoint_is_flagged(pretrained_file):
    kind = checkpoint_kind_of_albef(pretrained_file)
    issues = messages(protocol_issues("zero-shot", "coco", kind=kind, image_size=384, k=256,
                                      split_file="coco_test.json"))
    assert issues == ["384 px on a pretrained checkpoint: the paper evaluates it at 256 in the MSCOCO zero-shot row"]


def test_the_matching_row_gives_no_issue(tmp_path, albef_state, pretrained_file):
    kind = checkpoint_kind_of_albef(pretrained_file)
    assert protocol_issues("zero-shot", "coco", kind=kind, image_size=256, k=256,
                           split_file="/data/albef/coco_test.json") == []
    coco = tmp_path / "mscoco.pth"
    torch.save({"model": retrieval_layout(albef_state)}, coco)
    coco_kind = checkpoint_kind_of_albef(coco)
    for setting, dataset, k, file in (("zero-shot", "flickr", 128, "flickr30k_test.json"),
                                      ("fine-tuned", "coco", 256, "coco_test.json")):
        assert protocol_issues(setting, dataset, kind=coco_kind, image_size=384, k=k, split_file=file) == []
    # the COCO-fine-tuned model is not the Flickr-fine-tuned row's, and k and the file are checked too
    issues = messages(protocol_issues("fine-tuned", "flickr", kind=coco_kind, image_size=384, k=256,
                                      split_file="coco_test.json"))
    assert len(issues) == 3
    assert issues[0].startswith("a checkpoint fine-tuned on COCO in the Flickr30K fine-tuned row: the paper uses the "
                                "model fine-tuned on Flickr30K")
    assert issues[1] == "--k 256: the paper re-ranks the top 128 per query in the Flickr30K fine-tuned row (ALBEF's k_test)"
    assert issues[2] == "test file coco_test.json: the Flickr30K fine-tuned row uses ALBEF's flickr30k_test.json"


def test_what_cannot_be_told_is_said():
    unknown = CheckpointKind("fine-tuned", None, "ALBEF's retrieval key layout")
    issues = protocol_issues("zero-shot", "flickr", kind=unknown, image_size=None, k=128, split_file=None)
    assert [issue.severity for issue in issues] == ["unknown"] * 3
    assert issues[0].message.startswith("cannot tell what the fine-tuned checkpoint was fine-tuned on")


def test_our_run_configs_tell_the_checkpoint_kind():
    assert checkpoint_kind_of_ours(load_run_config("pretrain_emoji")).stage == "pretrained"
    assert checkpoint_kind_of_ours(load_run_config("pretrain_4m")).stage == "pretrained"
    assert checkpoint_kind_of_ours(load_run_config("finetune_coco")).dataset == "coco"
    assert checkpoint_kind_of_ours(load_run_config("finetune_flickr")).dataset == "flickr"
    emoji = checkpoint_kind_of_ours(load_run_config("finetune_emoji"))
    assert (emoji.stage, emoji.dataset) == ("fine-tuned", "other")
    issues = messages(protocol_issues("zero-shot", "flickr", kind=emoji, image_size=384, k=128,
                                      split_file="flickr30k_test.json"))
    assert len(issues) == 1 and "fine-tuned on other data" in issues[0]


def test_codis_eval_warns_and_strict_refuses_before_evaluating(pretrained_file, capsys):
    # a test file that does not exist: only the check runs before the exit, nothing is evaluated
    argv = ["--albef-checkpoint", str(pretrained_file), "--annotation", "missing/flickr30k_test.json",
            "--paper", "flickr", "--setting", "zero-shot", "--device", "cpu"]
    assert eval_main(argv + ["--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("codis-eval: warning: a pretrained checkpoint in the Flickr30K zero-shot row")
    assert len(err) == 2 and err[1].startswith("codis-eval: --strict: 1 difference(s)")
    # without --strict the warnings are printed and the evaluation goes on (to a later error: no tokenizer or file)
    assert eval_main(argv + ["--image-size", "256"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("codis-eval: warning: a pretrained checkpoint in the Flickr30K zero-shot row")
    assert err[1] == ("codis-eval: warning: 256 px on a pretrained checkpoint: the paper evaluates it at 384 in the "
                      "Flickr30K zero-shot row")
    assert len(err) == 3 and "warning" not in err[2] and "--strict" not in err[2]
    # the matching row: no warning; --strict without --paper is refused in one line
    assert eval_main(["--albef-checkpoint", str(pretrained_file), "--annotation", "missing/coco_test.json",
                      "--paper", "coco", "--k", "256", "--image-size", "256", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" not in err[0] and "--strict" not in err[0]
    assert eval_main(["--albef-checkpoint", str(pretrained_file), "--strict"]) == 2
    assert capsys.readouterr().err.strip() == ("codis-eval: --strict checks the evaluation against a poster row: give "
                                               "--paper coco|flickr (and --setting)")


def test_codis_eval_reads_our_run_folder_config(tmp_path, capsys):
    # a run folder's config.yaml is enough to tell the kind: the checkpoint itself is not read for the check
    (tmp_path / "config.yaml").write_text(load_run_config("finetune_flickr").to_yaml())
    checkpoint = str(tmp_path / "checkpoint_final.pt")
    assert eval_main([checkpoint, "--paper", "flickr", "--setting", "zero-shot", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("codis-eval: warning: a checkpoint fine-tuned on Flickr30K in the Flickr30K zero-shot "
                             "row: the paper uses the model fine-tuned on COCO (told from train.task: finetune, "
                             "data.train_files: flickr30k_train.json)")
    assert len(err) == 2 and err[1].startswith("codis-eval: --strict: 1 difference(s)")
    # the fine-tuned row it was made for: nothing to say, and the evaluation starts (the checkpoint is missing)
    assert eval_main([checkpoint, "--paper", "flickr", "--setting", "fine-tuned", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" not in err[0] and "checkpoint_final.pt" in err[0]
