"""Integrity of every weights file read back (issue 25, items 3, 4 and 6, and the minor resume cases).

A checkpoint whose bytes changed after it was written is refused (its digest, the CRC-32 of every record,
does not match) by resume, train.init_from, codis-finetune and codis-eval; truncated, empty and object-holding
files are one line with exit status 2 wherever weights enter; codis-eval keeps the key and shapes of a
mismatch on the lines after the first. No test changes an input file (sha256 before and after).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from codis_lib.checkpoint import (CheckpointReadError, list_checkpoints, load_checkpoint, readable_checkpoint,
                                  save_atomic)
from codis_lib.evaluation.cli import eval_main
from codis_lib.train.cli import finetune_main, pretrain_main
from tests.fixtures_data.corpus import SMALL_CORPUS_SIZE, small_emoji_corpus
from tests.helpers import tiny_run_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny runs lose from a second thread
PROTOCOL = ["--pair-batch-size", "64", "--device", "cpu"]


class Payload:
    """An object no weights-only load may build (the pickle names this class)."""


def _cli(overrides, *flags, main=pretrain_main):
    return main([item for value in overrides for item in ("--set", value)] + list(flags))


def _sha256(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    return error


def flip_bytes(path: Path, count: int = 30) -> None:
    """XOR 0x01 on `count` bytes spread over the largest record of a torch archive (the probe's damage)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    for k in range(count):
        data[start + k * max(1, info.file_size // count)] ^= 0x01
    path.write_bytes(bytes(data))


def bad_weight_files(folder: Path, checkpoint: Path) -> dict[str, Path]:
    """Write the four kinds of bad file from the issue next to each other; return {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {kind: folder / f"{kind}.pt" for kind in ("flipped", "cut", "empty", "objects")}
    shutil.copyfile(checkpoint, files["flipped"])
    flip_bytes(files["flipped"])
    files["cut"].write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 3])
    files["empty"].write_bytes(b"")
    torch.save({"model": {"w": torch.zeros(2)}, "note": Payload()}, files["objects"])
    return files


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A tiny run stopped after step 3 of 4 (checkpoints 2 and 3 kept), and its overrides."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    overrides = tiny_run_overrides(out, 4, **{"train.ckpt_every": 1, "train.keep_last": 2})
    assert _cli(overrides, "--stop-at-step", "3") == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_00000002.pt", "checkpoint_00000003.pt"]
    return out, overrides


def _copy(run, tmp_path) -> tuple[Path, list[str]]:
    out, overrides = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy, [o.replace(str(out), str(copy)) for o in overrides]


# ------------------------------------------------------------------------------------------ item 3: the digest
def test_a_bit_flipped_checkpoint_is_refused_naming_the_file(run, tmp_path):
    out, _ = run
    damaged = tmp_path / "checkpoint_00000003.pt"
    shutil.copyfile(out / "checkpoint_00000003.pt", damaged)
    flip_bytes(damaged)
    before = _sha256(tmp_path)
    with pytest.raises(CheckpointReadError) as info:
        load_checkpoint(damaged)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(damaged) in message and "CRC-32" in message
    assert not readable_checkpoint(damaged) and readable_checkpoint(out / "checkpoint_00000003.pt")
    assert _sha256(tmp_path) == before


def test_resume_refuses_a_damaged_checkpoint_and_keeps_the_intact_one(run, tmp_path, capsys):
    out, overrides = _copy(run, tmp_path)
    second, third = list_checkpoints(out)
    flip_bytes(third)
    before = _sha256(out)
    capsys.readouterr()
    assert _cli(overrides, "--resume", str(third)) == 2  # named explicitly: refused, the intact one offered
    error = _one_line(capsys)
    assert str(third) in error and "CRC-32" in error
    assert f"the latest intact earlier checkpoint is {second}" in error
    assert _sha256(out) == before  # nothing written, nothing pruned
    # resuming from the offered one, with checkpoints at other steps: the damaged one is never kept in its place
    every_two = [o for o in overrides if not o.startswith("train.ckpt_every")] + ["train.ckpt_every=2"]
    assert _cli(every_two, "--resume", str(second)) == 0
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["checkpoint_00000002.pt", "checkpoint_00000003.pt", "checkpoint_00000004.pt"], names
    assert _sha256(out)[str(second)] == before[str(second)] and _sha256(out)[str(third)] == before[str(third)]


def test_plain_resume_passes_over_a_damaged_latest_checkpoint_to_the_newest_intact_one(run, tmp_path, capsys):
    out, overrides = _copy(run, tmp_path)
    second, third = list_checkpoints(out)
    flip_bytes(third)
    kept = _sha256(out)[str(second)]
    capsys.readouterr()
    assert _cli(overrides, "--resume") == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "newest intact checkpoint" in line]
    assert len(said) == 1 and str(third) in said[0] and "CRC-32" in said[0]
    assert f"resuming from the newest intact checkpoint {second} instead" in said[0]
    assert readable_checkpoint(third)  # rewritten by the resumed run at its step, from the intact state
    assert _sha256(out).get(str(second), kept) == kept  # the intact one was never replaced by damaged bytes


def test_init_from_and_finetune_refuse_bad_files_in_one_line(run, tmp_path, capsys):
    out, _ = run
    inputs = tmp_path / "inputs"
    files = bad_weight_files(inputs, out / "checkpoint_00000003.pt")
    before = _sha256(inputs)
    for main in (pretrain_main, finetune_main):
        for kind, path in files.items():
            overrides = tiny_run_overrides(tmp_path / f"{main.__name__}_{kind}", 2, **{"train.init_from": str(path)})
            assert _cli(overrides, main=main) == 2, kind
            error = _one_line(capsys)
            assert "train.init_from" in error and str(path) in error, error
            assert "weights_only=False" not in error
    assert _sha256(inputs) == before


def test_pretrained_encoder_files_that_are_damaged_or_refused_are_one_line(run, tmp_path, capsys):
    out, _ = run
    inputs = tmp_path / "inputs"
    files = bad_weight_files(inputs, out / "checkpoint_00000003.pt")
    bert_dir = inputs / "bert"
    bert_dir.mkdir()
    (bert_dir / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    shutil.copyfile(files["cut"], bert_dir / "pytorch_model.bin")
    before = _sha256(inputs)
    cases = [("model.vision.pretrained", files[kind]) for kind in ("cut", "empty", "objects")]
    cases += [("model.text.pretrained", files[kind]) for kind in ("flipped", "objects")]
    cases += [("model.text.pretrained", bert_dir)]
    for key, path in cases:
        assert _cli(tiny_run_overrides(tmp_path / "fresh", 2, **{key: str(path)})) == 2, (key, path)
        error = _one_line(capsys)
        assert key in error and str(path) in error, error
    assert _sha256(inputs) == before


def _albef_export(tmp_path):
    from codis_lib.config import ModelConfig
    from codis_lib.data.tokenizer import load_tokenizer
    from codis_lib.evaluation.albef_models import export_albef_checkpoint
    from codis_lib.model import build_model

    corpus, _ = small_emoji_corpus()
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").with_tokenizer(load_tokenizer(corpus / "tokenizer")).with_overrides(
        {"vision.image_size": SMALL_CORPUS_SIZE, "mode": "albef"})
    checkpoint, config_file = export_albef_checkpoint(build_model(config), tmp_path / "albef" / "albef_tiny.pth")
    argv = ["--albef-config", str(config_file), "--tokenizer", str(corpus / "tokenizer"),
            "--annotation", str(corpus / "test.json"), "--k", "4"] + PROTOCOL
    return checkpoint, argv


def test_codis_eval_refuses_damaged_and_refused_files_in_one_line(run, tmp_path, capsys):
    out, _ = run
    ours = tmp_path / "ours"
    shutil.copytree(out, ours)
    flip_bytes(ours / "checkpoint_00000003.pt")
    albef, argv = _albef_export(tmp_path)
    files = bad_weight_files(tmp_path / "inputs", albef)
    before = {**_sha256(ours), **_sha256(tmp_path / "inputs")}
    assert eval_main([str(ours / "checkpoint_00000003.pt")] + PROTOCOL) == 2
    assert str(ours / "checkpoint_00000003.pt") in _one_line(capsys)
    for kind, path in files.items():
        assert eval_main(["--albef-checkpoint", str(path)] + argv) == 2, kind
        error = _one_line(capsys)
        assert str(path) in error and "weights_only=False" not in error, error
    assert {**_sha256(ours), **_sha256(tmp_path / "inputs")} == before


# ------------------------------------------------------------------------------------------ item 6
def test_codis_eval_keeps_the_detail_of_a_shape_mismatch(tmp_path, capsys):
    albef, argv = _albef_export(tmp_path)
    stored = torch.load(albef, weights_only=True)
    stored["model"]["vision_proj.weight"] = stored["model"]["vision_proj.weight"][:-1]
    torch.save(stored, albef)
    before = _sha256(albef.parent)
    assert eval_main(["--albef-checkpoint", str(albef)] + argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("codis-eval: ") and lines[0].endswith("does not fit the model:") and str(albef) in lines[0]
    assert any("vision_proj.weight: checkpoint (" in line and " vs model (" in line for line in lines[1:]), lines
    assert "Traceback" not in "\n".join(lines)
    assert _sha256(albef.parent) == before


# ------------------------------------------------------------------------------------------ the guarded reader
def test_the_guarded_reader_turns_every_bad_file_into_one_line(run, tmp_path):
    from codis_lib.model.weights_file import WeightsFileError, read_weights

    out, _ = run
    files = bad_weight_files(tmp_path / "inputs", out / "checkpoint_00000003.pt")
    text = tmp_path / "inputs" / "notes.pt"
    text.write_text("not weights\n")
    before = _sha256(tmp_path / "inputs")
    reasons = {"flipped": "CRC-32", "cut": "truncated", "empty": "empty", "objects": "Payload"}
    for kind, path in {**files, "text": text}.items():
        with pytest.raises(WeightsFileError) as info:
            read_weights(path, "test weights")
        message = str(info.value)
        assert len(message.splitlines()) == 1 and message.startswith(f"test weights {path}: "), message
        assert reasons.get(kind, "") in message
    assert isinstance(read_weights(out / "checkpoint_00000003.pt"), dict)
    assert _sha256(tmp_path / "inputs") == before


def test_checkpoints_are_written_with_their_digest_even_when_torch_is_told_not_to(tmp_path):
    switch = getattr(torch.serialization, "set_crc32_options", None)
    if switch is None:
        pytest.skip("this torch has no CRC-32 switch")
    switch(False)
    try:
        path = save_atomic({"model": {"w": torch.arange(1000.0)}}, tmp_path / "checkpoint_00000001.pt")
    finally:
        switch(True)
    with zipfile.ZipFile(path) as archive:
        assert all(info.CRC != 0 for info in archive.infolist() if info.file_size > 64)
    flip_bytes(path, 3)
    with pytest.raises(CheckpointReadError, match="CRC-32"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------ minor resume cases
def test_resuming_a_finished_run_leaves_no_temporary_file(run, tmp_path):
    out, overrides = _copy(run, tmp_path)
    assert _cli(overrides, "--resume") == 0  # finishes: checkpoint_final.pt links checkpoint 4
    assert _cli(overrides, "--resume") == 0  # a finished run, resumed: the final link again
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []
    assert (out / "checkpoint_final.pt").samefile(out / "checkpoint_00000004.pt")


def test_resuming_from_a_non_finite_weight_names_the_checkpoint(run, tmp_path, capsys):
    out, overrides = _copy(run, tmp_path)
    latest = list_checkpoints(out)[-1]
    checkpoint = load_checkpoint(latest)
    key = next(k for k, v in checkpoint["model"].items() if k.startswith("visual_encoder.") and v.is_floating_point())
    checkpoint["model"][key].view(-1)[0] = float("nan")
    save_atomic(checkpoint, latest)
    before = _sha256(out)
    capsys.readouterr()
    assert _cli(overrides, "--resume") == 2
    error = _one_line(capsys)
    assert str(latest) in error and key in error and "non-finite" in error and "Sinkhorn" not in error
    assert _sha256(out) == before


def test_resume_with_overwrite_says_that_resume_wins(run, tmp_path, capsys):
    out, overrides = _copy(run, tmp_path)
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert _cli(overrides + ["train.overwrite=true"], "--resume") == 0
    printed = capsys.readouterr().out
    said = [line for line in printed.splitlines() if "train.overwrite" in line]
    assert len(said) == 1 and "--resume" in said[0] and "nothing" in said[0], said
    assert f"resumed from {out / 'checkpoint_00000003.pt'}" in printed
    assert (out / "metrics.jsonl").read_text().startswith(metrics)  # the earlier records were not deleted


def test_a_file_without_checksums_loads_with_one_warning_line(tmp_path):
    from codis_lib.model.weights_file import read_weights, verify_digest

    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.arange(4.0)}}, legacy, _use_new_zipfile_serialization=False)
    before = _sha256(tmp_path)
    said = []
    stored = read_weights(legacy, "old weights", log=said.append)
    assert torch.equal(stored["model"]["w"], torch.arange(4.0)) and verify_digest(legacy) == "legacy"
    assert len(said) == 1 and str(legacy) in said[0] and "without verifying" in said[0], said
    assert _sha256(tmp_path) == before
