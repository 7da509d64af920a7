"""Nothing of the user's is overwritten or lost (issue 25): the corpus builder refuses a folder of the user's files,
codis-check-data never writes over an input, and every bad input is one line with exit status 2."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from codis_lib.data import emoji_corpus as ec
from codis_lib.data.emoji_manifest import BUILD_MARKER, check_corpus_folder, corpus_folder_is_ours
from tests.fixtures_data.corpus import small_emoji_corpus
from tests.helpers import tiny_run_overrides


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_line_exit_2(status: int, capsys) -> str:
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, (status, err)
    return err


@pytest.fixture()
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "userdir"
    folder.mkdir()
    (folder / "pretrain.json").write_text(json.dumps([{"image": "mine.png", "caption": "my own data"}]))
    return folder


# ---------------------------------------------------------------------------------------------- the corpus folder
def test_build_emoji_refuses_a_folder_of_the_users_files_naming_the_file(user_folder, capsys):
    before = _sha(user_folder / "pretrain.json")
    status = ec.main(["--out-dir", str(user_folder), "--limit", "30", "--image-size", "16", "--workers", "1"])
    err = _one_line_exit_2(status, capsys)
    assert str(user_folder / "pretrain.json") in err and "would be overwritten" in err
    assert _sha(user_folder / "pretrain.json") == before
    assert sorted(p.name for p in user_folder.iterdir()) == ["pretrain.json"]  # nothing added either


def test_a_folder_without_the_builders_files_is_refused_too(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt: would be overwritten"):
        check_corpus_folder(folder)
    check_corpus_folder(tmp_path / "new")  # absent: fine
    (tmp_path / "empty").mkdir()
    check_corpus_folder(tmp_path / "empty")  # empty: fine


def test_pretraining_with_data_root_on_the_users_folder_refuses_it(user_folder, tmp_path, capsys):
    from codis_lib.train.cli import pretrain_main

    before = _sha(user_folder / "pretrain.json")
    overrides = [o for o in tiny_run_overrides(tmp_path / "run", 1) if not o.startswith("data.root=")]
    argv = [arg for item in overrides + [f"data.root={user_folder}"] for arg in ("--set", item)]
    err = _one_line_exit_2(pretrain_main(argv), capsys)
    assert str(user_folder / "pretrain.json") in err and "data.root" in err
    assert _sha(user_folder / "pretrain.json") == before
    assert sorted(p.name for p in user_folder.iterdir()) == ["pretrain.json"]


def test_a_corpus_of_this_builder_is_its_own_with_or_without_the_marker(tmp_path):
    built, _ = small_emoji_corpus()
    assert corpus_folder_is_ours(built) and (built / BUILD_MARKER).is_file()
    older = tmp_path / "older"  # a corpus built before the manifest named its builder, and before the marker
    older.mkdir()
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest.pop("builder") == "codis-build-emoji"
    (older / "manifest.json").write_text(json.dumps(manifest))
    (older / "pretrain.json").write_text("[]")
    assert corpus_folder_is_ours(older)
    check_corpus_folder(older)
    (older / "manifest.json").write_text(json.dumps({"mine": True}))  # the user's own manifest.json
    assert not corpus_folder_is_ours(older)
    with pytest.raises(ValueError, match="manifest.json: would be overwritten"):
        check_corpus_folder(older)


def test_an_interrupted_build_continues_in_its_folder(tmp_path, monkeypatch):
    out = tmp_path / "emoji"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ec, "_write_annotations", interrupted)  # images rendered, no manifest yet
    with pytest.raises(KeyboardInterrupt):
        ec.build_emoji_corpus(out, 16, limit=8, vocab_size=300, workers=1)
    assert not (out / "manifest.json").exists() and any((out / "images").rglob("*.png"))
    monkeypatch.undo()
    manifest = ec.build_emoji_corpus(out, 16, limit=8, vocab_size=300, workers=1)
    assert (out / "manifest.json").is_file() and manifest["builder"] == "codis-build-emoji"


@pytest.mark.parametrize("argv, named", [(["--limit", "-5"], "limit=-5"), (["--workers", "0"], "workers=0")])
def test_build_emoji_bad_arguments_are_one_line(tmp_path, capsys, argv, named):
    err = _one_line_exit_2(ec.main(["--out-dir", str(tmp_path / "new")] + argv), capsys)
    assert named in err and not (tmp_path / "new").exists()


def test_build_emoji_into_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file.json"
    target.write_text("[1]")
    err = _one_line_exit_2(ec.main(["--out-dir", str(target), "--limit", "8"]), capsys)
    assert str(target) in err and "not a folder" in err and target.read_text() == "[1]"


# ---------------------------------------------------------------------------------------------- codis-check-data
@pytest.fixture()
def small_list(tmp_path) -> Path:
    """A pretraining list of three images, with a null and a numeric caption after them."""
    from PIL import Image

    folder = tmp_path / "m3"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(folder / f"{i}.png")
    records = [{"image": f"{i}.png", "caption": f"a red square {i}"} for i in range(3)]
    (folder / "m3.json").write_text(json.dumps(records + [{"image": "0.png", "caption": None},
                                                          {"image": "1.png", "caption": 5}]))
    return folder / "m3.json"


def _check(argv):
    from codis_lib.data.check import main

    return main([str(a) for a in argv] + ["--no-progress", "--workers", "1"])


@pytest.mark.parametrize("target", ["m3.json", "link.json", "0.png"])
def test_check_data_never_writes_its_cache_over_an_input(small_list, capsys, target):
    folder = small_list.parent
    (folder / "link.json").symlink_to("m3.json")
    before = {p.name: _sha(p) for p in folder.iterdir() if p.is_file()}
    err = _one_line_exit_2(_check([small_list, "--out", folder / "m3c.json", "--cache", folder / target]),
                           capsys)
    assert "--cache" in err and "would overwrite" in err
    assert {p.name: _sha(p) for p in folder.iterdir() if p.is_file()} == before
    err = _one_line_exit_2(_check([small_list, "--out", folder / "link.json"]), capsys)
    assert "--out" in err and _sha(small_list) == before["m3.json"]


def test_check_data_refuses_a_cache_path_that_is_someone_elses_file(small_list, capsys):
    notes = small_list.parent / "notes.jsonl"
    notes.write_text('{"mine": 1}\n')
    err = _one_line_exit_2(_check([small_list, "--cache", notes]), capsys)
    assert str(notes) in err and notes.read_text() == '{"mine": 1}\n'


def test_check_data_cache_in_a_folder_leaves_no_tmp(small_list, capsys):
    cache_dir = small_list.parent / "cache"
    cache_dir.mkdir()
    assert _check([small_list, "--out", small_list.parent / "m3c.json", "--cache", cache_dir]) == 0
    assert [p.name for p in cache_dir.iterdir()] == [".codis-check-cache.jsonl"]
    assert not list(small_list.parent.glob("*.tmp"))


def test_check_data_drops_null_and_numeric_captions_with_a_reason(small_list, capsys):
    assert _check([small_list, "--out", small_list.parent / "m3c.json"]) == 0
    report = json.loads((small_list.parent / "m3c.report.json").read_text())
    assert report["counts"]["bad_caption"] == 2 and report["kept"] == 3
    assert [r["index"] for r in report["dropped_records"]] == [3, 4]
    assert report["format"] == "caption_strings"


def _unwritable_folder(tmp_path) -> Path:
    import os

    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    probe = Path("/sys") / ".codis-probe"  # root writes anywhere but in such kernel folders
    try:
        probe.touch()
    except OSError:
        return probe.parent
    probe.unlink()
    pytest.skip("no folder this user cannot write")


def test_check_data_refuses_an_unwritable_out_before_decoding_any_image(small_list, tmp_path, capsys, monkeypatch):
    from codis_lib.data import check

    def no_decoding(*args, **kwargs):
        raise AssertionError("images were decoded before the output was found unwritable")

    monkeypatch.setattr(check, "check_image_files", no_decoding)
    locked = _unwritable_folder(tmp_path)
    err = _one_line_exit_2(_check([small_list, "--out", locked / "m3c.json", "--cache", tmp_path / "c.jsonl"]),
                           capsys)
    assert str(locked / "m3c.json") in err and "cannot write" in err


def test_a_latin1_annotation_file_is_named(tmp_path, capsys):
    from codis_lib.data.albef_json import AnnotationError, read_retrieval_eval

    path = tmp_path / "latin.json"
    path.write_bytes('[{"image": "caf\u00e9.png", "caption": ["x"]}]'.encode("latin-1"))
    with pytest.raises(AnnotationError, match="not UTF-8") as error:
        read_retrieval_eval(path)
    assert str(path) in str(error.value)
    err = _one_line_exit_2(_check([path]), capsys)
    assert str(path) in err and "UTF-8" in err


# ---------------------------------------------------------------------------------------------- decompression bombs
def _write_bomb(path: Path, side: int = 20000) -> Path:
    """Write a 1-bit palette PNG of side x side pixels (all zero): about 50 KB that Pillow refuses to decode."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then the row's bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0))
                     + chunk(b"PLTE", b"\xff\xff\xff\0\0\0") + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return _write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_the_bomb_is_small_and_refused_by_the_one_opener(bomb):
    from codis_lib.data.decode import ImageTooLargeError
    from codis_lib.data.image_source import decode_image

    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageTooLargeError, match="too large") as error:
        decode_image(str(bomb))
    assert str(bomb) in str(error.value) and "\n" not in str(error.value)


def test_check_data_drops_a_bomb_like_training_would(small_list, bomb, capsys):
    records = json.loads(small_list.read_text())[:3] + [{"image": str(bomb), "caption": "a bomb"}]
    small_list.write_text(json.dumps(records))
    assert _check([small_list, "--allow-outside-root"]) == 0
    report = json.loads(small_list.with_name("m3.clean.report.json").read_text())
    assert report["counts"]["undecodable_image"] == 1
    assert "too large to decode safely" in report["dropped_records"][0]["problem"]


def _bombed_corpus(tmp_path, bomb) -> tuple[Path, str]:
    """Return (a copy of the small corpus whose first pretraining image is the bomb, that image's path)."""
    root, _ = small_emoji_corpus()
    copy = tmp_path / "corpus"
    shutil.copytree(root, copy)
    victim = copy / json.loads((copy / "pretrain.json").read_text())[0]["image"]
    shutil.copyfile(bomb, victim)
    return copy, str(victim)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_training_refuses_or_drops_a_bomb_by_on_error(tmp_path, bomb, capsys, caplog, cache):
    from codis_lib.train.cli import pretrain_main

    corpus, victim = _bombed_corpus(tmp_path, bomb)
    before = _sha(corpus / "pretrain.json")

    def run(on_error: str, out: str) -> int:
        overrides = tiny_run_overrides(tmp_path / out, 1, **{"data.root": str(corpus), "data.on_error": on_error,
                                                              "data.cache_images": cache})
        return pretrain_main([arg for item in overrides for arg in ("--set", item)])

    err = _one_line_exit_2(run("raise", "refused"), capsys)
    assert victim in err and "too large to decode safely" in err
    with caplog.at_level("WARNING"):
        assert run("skip", "dropped") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # the cache names the problem; the readers' up-front check counts it (under corrupt_image)
    assert any("too large to decode safely" in m or "corrupt_image: 1" in m for m in warnings), warnings
    assert _sha(corpus / "pretrain.json") == before


def test_evaluation_refuses_a_bomb_in_one_line(tmp_path, bomb, capsys):
    from codis_lib.evaluation.cli import eval_main
    from codis_lib.run_config import load_run_config
    from codis_lib.train.engine import train

    corpus, victim = _bombed_corpus(tmp_path, bomb)
    train(load_run_config("pretrain_emoji", overrides=tiny_run_overrides(tmp_path / "run", 1)))
    records = json.loads((corpus / "test.json").read_text())[:4] + [{"image": victim, "caption": ["a bomb"]}]
    annotation = corpus / "bombed_test.json"
    annotation.write_text(json.dumps(records))
    status = eval_main([str(tmp_path / "run" / "checkpoint_final.pt"), "--annotation", str(annotation),
                        "--device", "cpu", "--k", "2"])
    err = _one_line_exit_2(status, capsys)
    assert victim in err and "too large to decode safely" in err
