"""`codis-check-data`: every defect found and dropped for its reason, the cache that makes a rescan free, the CLI.

The fixture corpus is built in tmp_path: real PNG, JPEG and TIFF files written by Pillow (good ones in
several modes, and missing, non-image, corrupt, truncated and LAB-mode ones) and an ALBEF pretraining
list with every record-level defect next to good records.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codis_lib.data.albef_json import read_pretrain_annotations, read_retrieval_eval, read_retrieval_train
from codis_lib.data.check import (REASONS, check_annotations, data_check_of, describe_data_checks, main,
                                  output_paths)
from codis_lib.data.decode import SUPPORTED_MODES, pil_to_rgb_array
from codis_lib.data.image_check import check_image_file, check_image_files

REPO = Path(__file__).resolve().parents[1]


def _noise(size: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write_images(root: Path) -> dict[str, str]:
    """Write the fixture's image files under ``root/images``; return {name: path relative to root}."""
    images = root / "images"
    images.mkdir(parents=True)
    Image.fromarray(_noise(seed=1)).save(images / "rgb.png")
    Image.fromarray(np.dstack([_noise(seed=2), np.full((24, 24, 1), 128, np.uint8)])).save(images / "rgba.png")
    Image.fromarray(_noise(seed=3)[..., 0]).save(images / "grey.jpg", quality=90)
    Image.fromarray(_noise(seed=4)).convert("P").save(images / "palette.png")
    Image.fromarray((_noise(seed=5)[..., 0].astype(np.uint16) * 257)).save(images / "grey16.png")
    assert Image.open(images / "grey16.png").mode.startswith("I")
    Image.new("LAB", (8, 8), (50, 10, 10)).save(images / "lab.tif")
    (images / "text.png").write_text("this is not an image")
    whole = (images / "rgb.png").read_bytes()
    (images / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (images / "no_end.png").write_bytes(whole[:-12])  # pixels complete, IEND chunk cut
    corrupt = bytearray(whole)
    corrupt[200:210] = b"\0" * 10  # inside the image data
    (images / "corrupt.png").write_bytes(bytes(corrupt))
    Image.fromarray(_noise(64, seed=6)).save(images / "full.jpg", quality=90)
    jpeg = (images / "full.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root.parent / "outside.png").write_bytes(whole)
    return {p.stem if p.suffix != ".jpg" else p.stem + "_jpg": f"images/{p.name}" for p in images.iterdir()}


def _fixture(tmp_path: Path) -> tuple[Path, list[dict], list[int], dict[str, int]]:
    """Return (annotation file, its records, indices of the records to keep, expected counts by reason)."""
    root = tmp_path / "corpus"
    img = _write_images(root)
    records_and_reasons = [
        ({"image": img["rgb"], "caption": "a red square"}, None),
        ({"image": img["rgba"], "caption": ["a blue circle", "blue circle"]}, None),
        ({"image": img["rgb"], "caption": "another caption of the same image"}, None),  # normal in COCO: kept
        ({"image": img["rgb"], "caption": "A red square."}, "duplicate"),  # the same after ALBEF's cleaning
        ({"image": img["rgba"], "caption": ["blue circle", "a blue circle"]}, "duplicate"),  # same caption set
        ({"image": "images/missing.png", "caption": "gone"}, "missing_image"),
        ({"image": img["text"], "caption": "text file"}, "undecodable_image"),
        ({"image": img["corrupt"], "caption": "corrupt data"}, "undecodable_image"),
        ({"image": img["truncated"], "caption": "half a png"}, "truncated_image"),
        ({"image": img["truncated_jpg"], "caption": "half a jpeg"}, "truncated_image"),
        ({"image": img["no_end"], "caption": "png without its end"}, "truncated_image"),
        ({"image": img["lab"], "caption": "lab colours"}, "wrong_mode"),
        ({"image": img["rgb"], "caption": "   \t "}, "empty_caption"),
        ({"image": img["rgb"], "caption": 42}, "bad_caption"),  # a number, null, a list holding one: dropped
        ({"image": img["rgb"], "caption": None}, "bad_caption"),
        ({"image": img["rgb"], "caption": ["fine", 3]}, "bad_caption"),
        ({"image": img["rgb"], "caption": ["fine", "..."]}, "empty_caption"),  # only deleted punctuation
        ({"image": img["rgb"], "caption": []}, "empty_caption"),
        ({"image": img["rgb"], "caption": " ".join(["word"] * 101)}, "long_caption"),
        ({"image": img["rgb"], "caption": "x" * 1001}, "long_caption"),
        ({"image": "../outside.png", "caption": "climbs out"}, "outside_root"),
        ({"image": str(tmp_path / "outside.png"), "caption": "absolute elsewhere"}, "outside_root"),
        ({"image": str(root / img["rgb"]), "caption": "absolute inside the root"}, None),
        ({"image": img["grey_jpg"], "caption": "grey jpeg"}, None),
        ({"image": img["palette"], "caption": "palette png"}, None),
        ({"image": img["grey16"], "caption": "sixteen bit grey"}, None),
        ({"image": img["full_jpg"], "caption": " ".join(["word"] * 100)}, None),  # at the limit: kept
    ]
    records = [record for record, _ in records_and_reasons]
    annotation = root / "pretrain.json"
    annotation.write_text(json.dumps(records, indent=1) + "\n")
    keep = [i for i, (_, reason) in enumerate(records_and_reasons) if reason is None]
    counts = {reason: sum(r == reason for _, r in records_and_reasons) for reason in REASONS}
    return annotation, records, keep, counts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_defect_is_dropped_for_its_reason_and_the_cleaned_json_is_exact(tmp_path):
    annotation, records, keep, counts = _fixture(tmp_path)
    assert all(counts[reason] for reason in REASONS)  # the fixture has every defect
    before = _sha256(annotation)
    result = check_annotations(annotation, workers=1, progress=False)
    assert _sha256(annotation) == before  # the input is never modified
    assert result.cleaned == annotation.with_name("pretrain.clean.json")
    assert json.loads(result.cleaned.read_text()) == [records[i] for i in keep]
    assert result.cleaned.read_text() == json.dumps([records[i] for i in keep], indent=1) + "\n"  # the input's layout
    report = json.loads(result.report_path.read_text())
    assert report["counts"] == counts and report["dropped"] == len(records) - len(keep)
    assert [r["index"] for r in report["dropped_records"]] == [i for i in range(len(records)) if i not in keep]
    assert all(r["image"] == records[r["index"]]["image"] for r in report["dropped_records"])
    by_index = {r["index"]: r for r in report["dropped_records"]}
    assert "record 0" in by_index[3]["problem"] and "record 1" in by_index[4]["problem"]
    assert report["notes"]["images_with_several_records"] == 1  # rgb.png: three captions (one absolute path)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["input"]["sha256"] == before and manifest["cleaned"]["sha256"] == _sha256(result.cleaned)
    assert manifest["counts"] == counts and manifest["cleaned"]["records"] == len(keep)
    assert manifest["image_root"] == str(annotation.parent) and manifest["tool"] == "codis-check-data"
    # What is kept reads strictly (every image verified) and decodes with the training decoder.
    kept = read_pretrain_annotations(result.cleaned, annotation.parent, on_error="raise", check_images="verify")
    assert len(kept) == len(keep)
    for record in kept:
        with Image.open(record.image) as image:
            image.load()
            assert pil_to_rgb_array(image).shape[2] == 3


def test_outside_root_records_can_be_kept_and_their_images_are_still_checked(tmp_path):
    annotation, records, keep, counts = _fixture(tmp_path)
    result = check_annotations(annotation, workers=1, progress=False, allow_outside_root=True)
    assert result.report["counts"]["outside_root"] == 0
    assert json.loads(result.cleaned.read_text()) == [r for i, r in enumerate(records)
                                                       if i in keep or "outside" in r["image"]]


def test_a_clean_file_is_copied_byte_for_byte_and_the_retrieval_formats_are_read(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2)):
        Image.fromarray(_noise(seed=seed)).save(root / name)
    train = root / "train.json"
    train.write_text(json.dumps([{"image": "a.png", "caption": "one", "image_id": 7},
                                 {"image": "a.png", "caption": "two", "image_id": 7},
                                 {"image": "b.png", "caption": "three", "image_id": "b"}]))
    test = root / "test.json"
    test.write_text(json.dumps([{"image": "a.png", "caption": ["one", "two"]}, {"image": "b.png", "caption": ["x"]}],
                               indent=2))
    for file, fmt in ((train, "retrieval_train"), (test, "caption_lists")):
        result = check_annotations(file, out=tmp_path / "out" / file.name, workers=1, progress=False)
        assert result.cleaned.read_bytes() == file.read_bytes() and result.report["format"] == fmt
        assert result.report["dropped"] == 0 and sum(result.report["counts"].values()) == 0
    assert len(read_retrieval_train(tmp_path / "out" / "train.json", root)) == 3
    assert len(read_retrieval_eval(tmp_path / "out" / "test.json", root)) == 2


def test_the_decoder_converts_every_mode_it_claims():
    converted = 0
    for mode in sorted(SUPPORTED_MODES):
        try:
            image = Image.new(mode, (3, 2))
        except (ValueError, KeyError):  # a mode Pillow reads from files but cannot create (I;16N on some builds)
            continue
        assert pil_to_rgb_array(image).shape == (2, 3, 3), mode
        converted += 1
    assert converted >= 15
    with pytest.raises(ValueError, match="'LAB'"):
        pil_to_rgb_array(Image.new("LAB", (2, 2)))


# ------------------------------------------------------------------------------------------ the cache
def test_a_second_run_decodes_nothing_and_a_changed_file_is_decoded_again(tmp_path):
    annotation, records, keep, counts = _fixture(tmp_path)
    first = check_annotations(annotation, workers=1, progress=False)
    images = first.report["images"]
    assert images["decoded"] == images["images"] - images["missing"] > 10 and images["from_cache"] == 0
    second = check_annotations(annotation, workers=1, progress=False)
    assert second.report["images"]["decoded"] == 0
    assert second.report["images"]["from_cache"] == images["decoded"]
    assert second.report["dropped_records"] == first.report["dropped_records"]
    good = annotation.parent / "images" / "rgb.png"
    good.write_bytes(good.read_bytes()[:-12])  # now truncated: a new size and mtime
    third = check_annotations(annotation, workers=1, progress=False)
    assert third.report["images"]["decoded"] == 1
    assert third.report["counts"]["truncated_image"] == counts["truncated_image"] + 4  # every record of rgb.png kept


def test_an_interrupted_scan_continues_where_it_stopped(tmp_path):
    """What an interruption leaves (some result lines, the last one cut) is used; only the rest is decoded."""
    folder = tmp_path / "many"
    folder.mkdir()
    paths = []
    for i in range(30):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(_noise(8, seed=i)).save(paths[-1])
    cache = tmp_path / "cache.jsonl"
    full, stats = check_image_files(paths, cache=cache, progress=False)
    assert stats.decoded == 30
    lines = cache.read_text().splitlines(keepends=True)
    assert len(lines) == 31  # the header and one line per image
    cache.write_text("".join(lines[:12]) + lines[12][: len(lines[12]) // 2])  # 11 results and half of one
    again, stats = check_image_files(paths, cache=cache, progress=False)
    assert (stats.decoded, stats.from_cache) == (19, 11) and again == full
    assert check_image_files(paths, cache=cache, progress=False)[1].decoded == 0


@pytest.mark.slow
def test_ctrl_c_stops_the_pool_and_the_rerun_decodes_only_the_rest(tmp_path):
    """A real SIGINT to the command with 2 workers: exit 130, and the next run decodes the images not cached."""
    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(600):
        Image.fromarray(_noise(160, seed=i)).save(root / "images" / f"{i}.png", compress_level=1)
        records.append({"image": f"images/{i}.png", "caption": f"image {i}"})
    annotation = root / "pretrain.json"
    annotation.write_text(json.dumps(records))
    cache = root / ".codis-check-cache.jsonl"
    command = [sys.executable, "-m", "codis_lib.data.check", str(annotation), "--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # SIGINT as a terminal's Ctrl-C finds it: a shell starts background jobs with SIGINT ignored, a child
    # inherits that, and Python then installs no KeyboardInterrupt handler (the scan would run to the end).
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 30):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err, err
    cached = len(cache.read_text().splitlines()) - 1
    assert 30 <= cached < 600
    assert not annotation.with_name("pretrain.clean.json").exists()
    rerun = check_annotations(annotation, workers=2, progress=False)
    assert rerun.report["images"]["decoded"] == 600 - cached and rerun.report["images"]["from_cache"] == cached
    assert rerun.report["dropped"] == 0


# ------------------------------------------------------------------------------------------ the command line
def _run(argv, capsys) -> tuple[int, str, str]:
    status = main([str(a) for a in argv] + ["--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    annotation, records, keep, counts = _fixture(tmp_path)
    status, out, err = _run([annotation, "--workers", 2, "--out", tmp_path / "o" / "clean.json"], capsys)
    assert status == 0 and err == "" and f"kept {len(keep)}, dropped {len(records) - len(keep)}" in out
    assert (tmp_path / "o" / "clean.report.json").is_file() and (tmp_path / "o" / "clean.manifest.json").is_file()
    assert json.loads((tmp_path / "o" / "clean.json").read_text()) == [records[i] for i in keep]  # pool == in-process
    assert _run([annotation, "--out", tmp_path / "o" / "clean.json", "--fail-on-defects"], capsys)[0] == 1
    bad = tmp_path / "bad.json"
    cases = [("not json", "not valid JSON"), (json.dumps({"image": "x"}), "expected a JSON list"),
             (json.dumps([{"image": "a.png", "caption": "x"}, {"caption": "y"}]), "record 1: record has no 'image'"),
             (json.dumps([{"image": "a.png"}]), "record 0: record has no 'caption'"),
             (json.dumps([{"image": "a", "caption": "x", "image_id": 1}, {"image": "b", "caption": "y"}]),
              "record 1: record has no 'image_id'")]
    for text, message in cases:
        bad.write_text(text)
        status, out, err = _run([bad], capsys)
        assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, (text, err)
        assert str(bad) in err and message in err, (text, err)
    bad.write_bytes(b'[{"image": "\xff"}]')
    assert _run([bad], capsys)[0] == 2
    for argv, message in (([tmp_path / "absent.json"], "annotation file not found"),
                          ([annotation, "--image-root", tmp_path / "nowhere"], "--image-root"),
                          ([annotation, "--out", annotation], "would overwrite the input"),
                          ([annotation, "--workers", 0], "--workers 0")):
        status, out, err = _run(argv, capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_the_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'codis-check-data = "codis_lib.data.check:main"' in text


# ------------------------------------------------------------------------------------------ training's side
def test_the_manifest_beside_a_cleaned_file_is_found_and_a_changed_file_is_told(tmp_path):
    annotation, records, keep, counts = _fixture(tmp_path)
    result = check_annotations(annotation, workers=1, progress=False)
    assert output_paths(result.cleaned, result.cleaned)[2] == result.manifest_path
    check = data_check_of(result.cleaned)
    assert check["matches"] and check["manifest_sha256"] == _sha256(result.manifest_path)
    assert (check["dropped"], check["records"]) == (len(records) - len(keep), len(records))
    line = describe_data_checks([check])
    assert f"{len(records) - len(keep)} of {len(records)} records dropped" in line
    assert check["manifest_sha256"][:12] in line
    assert data_check_of(annotation) is None  # no manifest beside the input
    result.cleaned.write_text(result.cleaned.read_text().replace("red", "green"))
    changed = data_check_of(result.cleaned)
    assert not changed["matches"] and "CHANGED since its check" in describe_data_checks([changed])
    other = tmp_path / "x.json"
    other.write_text("[]")
    (tmp_path / "x.manifest.json").write_text(json.dumps({"tool": "something else"}))
    assert data_check_of(other) is None


@pytest.mark.slow
def test_training_on_a_cleaned_file_logs_its_manifest(tmp_path, capsys):
    from codis_lib.train.cli import pretrain_main
    from codis_lib.metrics_log import read_jsonl
    from tests.fixtures_data.corpus import small_emoji_corpus
    from tests.helpers import tiny_run_overrides

    root, _ = small_emoji_corpus()
    cleaned = tmp_path / "checked" / "pretrain.clean.json"
    result = check_annotations(root / "pretrain.json", out=cleaned, workers=1, progress=False)
    assert result.report["dropped"] == 0
    overrides = tiny_run_overrides(tmp_path / "run", 1, **{"data.train_files": f"[{cleaned}]",
                                                           "data.image_root": str(root)})
    assert pretrain_main([item for value in overrides for item in ("--set", value)]) == 0
    out = capsys.readouterr().out
    start = next(line for line in out.splitlines() if "training samples" in line)
    manifest_sha = _sha256(result.manifest_path)
    assert "data checked: pretrain.clean.json by codis-check-data" in start and manifest_sha[:12] in start
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl", kind="data_check")
    assert logged == [{"kind": "data_check", "step": 0, "file": str(cleaned), "manifest": str(result.manifest_path),
                       "manifest_sha256": manifest_sha, "matches": True}]
