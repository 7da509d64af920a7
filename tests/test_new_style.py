"""The held-out art style: Noto Color Emoji drawings of the evaluation emoji, never of training ones."""
import json
import logging

import pytest
from PIL import Image

from codis_lib.data.emoji_concepts import STYLE_SPLITS
from codis_lib.data.emoji_manifest import emoji_split_file, sha256_file
from codis_lib.data.emoji_new_style import NEW_STYLE_MANIFEST, build_new_style, noto_font_path
from tests.fixtures_data.corpus import SMALL_CORPUS_SIZE, small_emoji_corpus

needs_font = pytest.mark.skipif(noto_font_path() is None, reason="no Noto Color Emoji font "
                                "(apt-get install fonts-noto-color-emoji; .ci/run installs it)")


@pytest.fixture(scope="module")
def small():
    return small_emoji_corpus()


@needs_font
def test_the_style_splits_draw_the_evaluation_emoji_in_noto_and_nothing_trains_on_them(small):
    out, manifest = small
    assert manifest["new_style"] is not None
    pretrain = json.loads((out / "pretrain.json").read_text())
    train = json.loads((out / "train.json").read_text())
    assert not any("noto" in r["image"] for r in pretrain + train)  # no Noto art in training, of any kind
    for split, source in (("new_style", "new_drawings"), ("new_style_test", "test")):
        rows = json.loads(emoji_split_file(out, split).read_text())
        by_key = {r["image"].rsplit("/", 1)[1]: r["caption"] for r in json.loads((out / f"{source}.json").read_text())}
        assert rows, split
        for row in rows:
            assert row["image"].startswith("images/noto/")
            assert row["caption"] == by_key[row["image"].rsplit("/", 1)[1]]  # same emoji, same captions
            image = Image.open(out / row["image"])
            assert image.size == (SMALL_CORPUS_SIZE, SMALL_CORPUS_SIZE) and image.mode == "RGB"
            assert image.getextrema() != ((255, 255),) * 3  # something is drawn, not a blank square
        counts = manifest["new_style"][split]
        assert counts["images"] == len(rows) and counts["of"] == len(by_key)


@needs_font
def test_a_second_build_keeps_the_files_and_a_changed_image_is_redrawn(small):
    out, _ = small
    first = json.loads((out / NEW_STYLE_MANIFEST).read_text())
    image = next(rel for rel in first["files"] if rel.endswith(".png"))
    assert build_new_style(out) == first
    (out / image).write_bytes(b"not a png")
    again = build_new_style(out)
    assert sha256_file(out / image) == first["files"][image] == again["files"][image]


@needs_font
def test_an_emoji_the_font_cannot_draw_is_left_out_with_its_reason(small, tmp_path):
    from codis_lib.data.emoji_new_style import _NotoRenderer

    renderer = _NotoRenderer(noto_font_path(), 32)
    image, why = renderer.render("\U0001F431")  # cat face: in every version of the font
    assert why is None and image.size == (32, 32)
    image, why = renderer.render("\U000F0000")  # a private-use code point: no emoji font draws it
    assert image is None and why == "not in the font"


def test_without_the_font_the_splits_are_skipped_in_one_line(small, tmp_path, monkeypatch, caplog):
    import codis_lib.data.emoji_new_style as new_style

    monkeypatch.setattr(new_style, "_FONT_PLACES", ())
    monkeypatch.delenv("CODIS_NOTO_FONT", raising=False)
    with caplog.at_level(logging.WARNING):
        assert build_new_style(tmp_path) is None
    assert "fonts-noto-color-emoji" in caplog.text
    for split in STYLE_SPLITS:
        with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
            emoji_split_file(tmp_path, split)


def test_a_missing_font_file_named_by_the_environment_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("CODIS_NOTO_FONT", str(tmp_path / "nope.ttf"))
    with pytest.raises(FileNotFoundError, match="CODIS_NOTO_FONT"):
        noto_font_path()


def test_the_trainer_skips_a_style_split_the_corpus_lacks_and_keeps_the_others(small, tmp_path):
    import shutil

    from codis_lib import load_run_config
    from codis_lib.evaluation.report import available_eval_splits

    out, _ = small
    copy = tmp_path / "emoji"
    shutil.copytree(out, copy)
    for split in STYLE_SPLITS:
        (copy / f"{split}.json").unlink(missing_ok=True)
    config = load_run_config("pretrain_emoji", overrides={"data.root": str(copy)})
    said = []
    found = available_eval_splits(config, ["new_drawings", "new_style", "test", "new_style_test"], log=said.append)
    assert found == ["new_drawings", "test"]
    assert len(said) == 2 and all("fonts-noto-color-emoji" in line for line in said)
    (copy / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match="test"):  # a split every corpus has is still an error
        available_eval_splits(config, ["test"])
