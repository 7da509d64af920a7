"""ALBEF annotation readers: caption cleaning, image roots, and bad input named by file and record index."""
import json
import logging
import re
import shutil

import pytest

from codis_lib.data.albef_json import (
    AnnotationError,
    pre_caption,
    read_pretrain_annotations,
    read_retrieval_eval,
    read_retrieval_train,
)
from tests.fixtures_data.corpus import FIXTURES, write_coco_style_images


# ---------------------------------------------------------------------------------------------
# pre_caption: ALBEF's dataset/utils.py, character for character


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Man riding a HORSE.", "a man riding a horse"),
        ("flag: Côte d’Ivoire", "flag côte d’ivoire"),  # curly apostrophe and accents are kept
        ("keycap: #", "keycap"),  # '#' is deleted
        ("Hello, world! (really?) \"yes\" ~ * ; :", "hello world really yes"),
        ("face with tears-of-joy / crying", "face with tears of joy crying"),  # '-' and '/' become spaces
        ("a <person> waving", "a person waving"),
        ("  lots   of    spaces  ", "lots of spaces"),
        ("rock & roll", "rock & roll"),  # '&' is not in ALBEF's list
        ("tab\tstays single", "tab\tstays single"),  # a lone tab is not a run of 2+ whitespace in ALBEF
        ("it's 5 o'clock", "its 5 oclock"),
    ],
)
def test_pre_caption_matches_albef(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_to_max_words():
    caption = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(caption, max_words=30).split(" ") == [f"w{i}" for i in range(30)]
    assert pre_caption("one two three", max_words=2) == "one two"


# ---------------------------------------------------------------------------------------------
# Good files: the three formats, image roots


@pytest.fixture()
def coco_root(tmp_path):
    return write_coco_style_images(tmp_path / "coco")


def test_reads_the_three_albef_formats(coco_root):
    train = read_retrieval_train(FIXTURES / "coco_karpathy_train.json", coco_root)
    assert [r.image_id for r in train] == ["coco_1", "coco_1", "coco_2", "coco_3"]
    assert train[0].caption == "a red heart drawn as a flat icon"
    assert train[0].image == str(coco_root / "val2014/COCO_val2014_000000000001.jpg")
    assert (train[2].source, train[2].index) == (str(FIXTURES / "coco_karpathy_train.json"), 2)

    test = read_retrieval_eval(FIXTURES / "coco_karpathy_test.json", coco_root)
    assert len(test) == 2 and [len(r.captions) for r in test] == [5, 5]
    assert test[0].captions[2] == "red heart on white"

    pretrain = read_pretrain_annotations(FIXTURES / "pretrain_list.json", coco_root)
    assert [r.captions for r in pretrain] == [
        ("a red heart",), ("a small yellow bird", "baby chick"), ("an arrow pointing right",)]
    assert not pretrain.skipped


def test_image_root_defaults_to_the_json_folder_and_absolute_paths_stay(coco_root, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(coco_root / "val2014/COCO_val2014_000000000001.jpg", local / "a.jpg")
    absolute = str(coco_root / "train2014/COCO_train2014_000000000002.jpg")
    path = local / "list.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}, {"image": absolute, "caption": "y"}]))
    records = read_pretrain_annotations(path)  # no image_root: relative to the JSON's folder
    assert [r.image for r in records] == [str(local / "a.jpg"), absolute]


# ---------------------------------------------------------------------------------------------
# Bad input: each case names the file and the record index; skip counts


def _write(tmp_path, records, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def _bad_cases(coco_root, tmp_path):
    good = str(coco_root / "val2014/COCO_val2014_000000000001.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(open(good, "rb").read()[:200])  # truncated JPEG
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not a picture")
    return {
        "missing image file": ({"image": str(tmp_path / "nope.jpg"), "caption": "c", "image_id": 1}, "not found"),
        "truncated image": ({"image": str(corrupt), "caption": "c", "image_id": 1}, "corrupt"),
        "text file as image": ({"image": str(not_an_image), "caption": "c", "image_id": 1}, "corrupt"),
        "empty caption": ({"image": good, "caption": "", "image_id": 1}, "empty"),
        "caption empty after cleaning": ({"image": good, "caption": " ?!. ", "image_id": 1}, "empty"),
        "no image field": ({"caption": "c", "image_id": 1}, "'image'"),
        "no caption field": ({"image": good, "image_id": 1}, "'caption'"),
    }


@pytest.mark.parametrize("case", ["missing image file", "truncated image", "text file as image", "empty caption",
                                  "caption empty after cleaning", "no image field", "no caption field"])
@pytest.mark.parametrize("reader", ["pretrain", "retrieval_train", "retrieval_eval"])
def test_bad_record_raises_naming_file_and_index(coco_root, tmp_path, case, reader):
    good = {"image": str(coco_root / "val2014/COCO_val2014_000000000001.jpg"), "caption": "fine", "image_id": 1}
    bad, message = _bad_cases(coco_root, tmp_path)[case]
    if reader == "retrieval_eval":  # test records hold a caption list
        good = {"image": good["image"], "caption": ["fine"]}
        bad = {k: ([v] if k == "caption" else v) for k, v in bad.items() if k != "image_id"}
    path = _write(tmp_path, [good, good, bad, good])
    read = {"pretrain": read_pretrain_annotations, "retrieval_train": read_retrieval_train,
            "retrieval_eval": read_retrieval_eval}[reader]
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: record 2: ")) as info:
        read(path)
    assert message in str(info.value)
    assert (info.value.path, info.value.index) == (str(path), 2)


def test_json_that_is_not_a_list_is_refused(tmp_path):
    path = _write(tmp_path, {"image": "a.jpg", "caption": "c"})
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*expected a JSON list.*dict"):
        read_pretrain_annotations(path)
    broken = tmp_path / "broken.json"
    broken.write_text("[{\"image\": ")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        read_retrieval_eval(broken)
    with pytest.raises(AnnotationError, match="not found"):
        read_retrieval_train(tmp_path / "absent.json")


def test_retrieval_train_needs_image_id_and_eval_needs_a_caption_list(coco_root, tmp_path):
    image = str(coco_root / "val2014/COCO_val2014_000000000001.jpg")
    path = _write(tmp_path, [{"image": image, "caption": "c", "image_id": "a"}, {"image": image, "caption": "c"}])
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: record 1: ") + ".*image_id"):
        read_retrieval_train(path)
    path = _write(tmp_path, [{"image": image, "caption": "one string"}], name="test.json")
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: record 0: ") + ".*list of captions"):
        read_retrieval_eval(path)


def test_skip_option_drops_and_counts_bad_records(coco_root, tmp_path, caplog):
    cases = _bad_cases(coco_root, tmp_path)
    good = {"image": str(coco_root / "val2014/COCO_val2014_000000000001.jpg"), "caption": "fine", "image_id": 1}
    records = [good, *[bad for bad, _ in cases.values()], good]
    path = _write(tmp_path, records)
    with caplog.at_level(logging.WARNING, logger="codis_lib.data.albef_json"):
        result = read_retrieval_train(path, on_error="skip")
    assert len(result) == 2
    assert dict(result.skipped) == {"missing_image": 1, "corrupt_image": 2, "empty_caption": 2,
                                    "missing_image_field": 1, "missing_caption_field": 1}
    assert "skipped 7 bad record(s) of 9" in caplog.text and str(path) in caplog.text


def test_check_images_levels(coco_root, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    path = _write(tmp_path, [{"image": str(corrupt), "caption": "c"}])
    with pytest.raises(AnnotationError, match="corrupt"):
        read_pretrain_annotations(path, check_images="verify")
    assert len(read_pretrain_annotations(path, check_images="exists")) == 1  # only existence is checked
    with pytest.raises(ValueError, match="on_error='ignore'"):
        read_pretrain_annotations(path, on_error="ignore")
