"""Guards on the data side: exact decoding of every PIL mode, skipped records reachable from the config and
counted, images outside the image root named, and a run folder's config.yaml that records the vocabulary used."""
from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from codis_lib.data.albef_json import AnnotationError, read_retrieval_eval
from codis_lib.data.datasets import PretrainDataset, RetrievalEvalDataset, decode_image
from codis_lib.data.decode import pil_to_rgb_array
from codis_lib.data.transforms import to_uint8_tensor
from codis_lib.run_config import ConfigError, load_run_config
from tests.fixtures_data.corpus import small_emoji_corpus
from tests.helpers import tiny_run_overrides

WHITE, GREY_BG = (255, 255, 255), (10, 20, 30)


def _round_trip(image: Image.Image, fmt: str, **save) -> Image.Image:
    """Return ``image`` written to ``fmt`` and read back (what the datasets see from a file)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    buffer.seek(0)
    read = Image.open(buffer)
    read.load()
    return read


def _over(colour, alpha, background):
    """The by-hand compositing of one pixel: round(c a / 255 + bg (255 - a) / 255)."""
    c_, a_ = [int(c) for c in colour], int(alpha)
    return [int(np.floor(c * a_ / 255 + b * (255 - a_) / 255 + 0.5)) for c, b in zip(c_, background)]


# ------------------------------------------------------------------------------------------------ case 4
def test_sixteen_bit_grey_png_is_scaled_not_white():
    """issue case 4: a 16-bit grey PNG (I;16 / I;16B / I) decodes to v * 255 / 65535, not solid white."""
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    expected_grey = np.array([[0, 1, 4, 128, 255]], dtype=np.uint8)  # round(v / 257) by hand
    expected = np.repeat(expected_grey[..., None], 3, axis=-1)
    sixteen = Image.fromarray(values)  # mode I;16
    assert sixteen.mode == "I;16"
    from_png = _round_trip(sixteen, "PNG")  # Pillow reads 16-bit grey PNG as I;16 or I
    assert from_png.mode in ("I;16", "I")
    big_endian = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode I
    for image in (sixteen, from_png, big_endian, as_int32):
        assert np.array_equal(pil_to_rgb_array(image), expected), image.mode


def test_every_mode_decodes_to_the_by_hand_rgb():
    """issue case 4: each PIL mode the formats allow gives the by-hand RGB (alpha composited on the background)."""
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [0, 0, 0, 64]]], dtype=np.uint8)
    for background in (WHITE, GREY_BG):
        expected = np.array([[_over(px[:3], px[3], background) for px in rgba[0]]], dtype=np.uint8)
        image = _round_trip(Image.fromarray(rgba, "RGBA"), "PNG")
        assert np.array_equal(pil_to_rgb_array(image, background), expected), background
        la = np.array([[[90, 255], [90, 0], [90, 100]]], dtype=np.uint8)
        expected_la = np.array([[_over([90] * 3, a, background) for _, a in la[0]]], dtype=np.uint8)
        assert expected_la[0, 2].tolist() == ([190] * 3 if background == WHITE else [41, 47, 54])  # by hand
        assert np.array_equal(pil_to_rgb_array(_round_trip(Image.fromarray(la, "LA"), "PNG"), background), expected_la)
    # a fully transparent RGBA pixel that stores black is the background, not black (the corpus is on white)
    assert pil_to_rgb_array(Image.fromarray(rgba, "RGBA"))[0, 1].tolist() == [255, 255, 255]

    grey = np.array([[0, 77, 255]], dtype=np.uint8)
    assert np.array_equal(pil_to_rgb_array(_round_trip(Image.fromarray(grey, "L"), "PNG")),
                          np.repeat(grey[..., None], 3, axis=-1))
    bits = Image.new("1", (3, 1))
    bits.putdata([255, 0, 255])
    assert _round_trip(bits, "PNG").mode == "1"
    assert pil_to_rgb_array(_round_trip(bits, "PNG"))[0].tolist() == [[255] * 3, [0] * 3, [255] * 3]

    rgb = np.array([[[1, 2, 3], [250, 128, 0]]], dtype=np.uint8)
    assert np.array_equal(pil_to_rgb_array(_round_trip(Image.fromarray(rgb, "RGB"), "PNG")), rgb)

    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2])
    opaque = _round_trip(palette, "PNG")
    assert opaque.mode == "P" and "transparency" not in opaque.info
    assert pil_to_rgb_array(opaque)[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    transparent = _round_trip(palette, "PNG", transparency=1)  # palette entry 1 (green) is transparent
    assert transparent.mode == "P" and "transparency" in transparent.info
    assert pil_to_rgb_array(transparent, GREY_BG)[0].tolist() == [[255, 0, 0], list(GREY_BG), [0, 0, 255]]
    gif = _round_trip(palette, "GIF", transparency=2)
    assert pil_to_rgb_array(gif)[0].tolist()[2] == [255, 255, 255]

    keyed = _round_trip(Image.fromarray(rgb, "RGB"), "PNG", transparency=(250, 128, 0))  # tRNS colour key
    assert pil_to_rgb_array(keyed, GREY_BG)[0].tolist() == [[1, 2, 3], list(GREY_BG)]

    floats = Image.fromarray(np.array([[-3.0, 0.4, 127.5, 254.6, 300.0]], dtype=np.float32), "F")
    assert pil_to_rgb_array(floats)[0, :, 0].tolist() == [0, 0, 128, 255, 255]

    cmyk = np.array([[[10, 20, 30, 40], [200, 100, 50, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    expected_cmyk = [[207, 198, 190], [55, 155, 205], [0, 0, 0]]  # round((255 - C)(255 - K) / 255): 245 * 215 / 255 = 206.6
    from_jpeg_mode = Image.fromarray(cmyk, "CMYK")
    assert pil_to_rgb_array(from_jpeg_mode)[0].tolist() == expected_cmyk
    assert pil_to_rgb_array(from_jpeg_mode)[0].tolist() == np.asarray(from_jpeg_mode.convert("RGB"))[0].tolist()

    ycc = np.array([[[100, 90, 200], [50, 128, 128], [255, 0, 255]]], dtype=np.uint8)
    y, cb, cr = (ycc[0, :, i].astype(float) for i in range(3))
    expected_ycc = np.clip(np.floor(np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                                              y + 1.772 * (cb - 128)], -1) + 0.5), 0, 255)
    assert pil_to_rgb_array(Image.fromarray(ycc, "YCbCr"))[0].tolist() == expected_ycc.astype(int).tolist()

    with pytest.raises(ValueError, match="'LAB'"):
        pil_to_rgb_array(Image.new("LAB", (2, 2)))


def test_decoding_through_the_datasets_composites_on_white(tmp_path):
    """issue case 4: decode_image, to_uint8_tensor and the datasets composite transparency on white by default."""
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent black everywhere ...
    rgba[0, 0] = [0, 0, 255, 255]  # ... except one opaque blue pixel
    path = tmp_path / "art.png"
    Image.fromarray(rgba, "RGBA").save(path)
    decoded = decode_image(str(path))
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 4, 4)
    assert decoded[:, 0, 0].tolist() == [0, 0, 255] and decoded[:, 1:, :].eq(255).all()
    assert decode_image(str(path), background=GREY_BG)[:, 3, 3].tolist() == list(GREY_BG)
    with Image.open(path) as image:
        assert torch.equal(to_uint8_tensor(image), decoded)
    (tmp_path / "test.json").write_text(json.dumps([{"image": "art.png", "caption": ["a blue dot"]}]))
    dataset = RetrievalEvalDataset(tmp_path / "test.json", image_size=4, cache=True, background=GREY_BG)
    assert torch.equal(dataset._source.load(str(tmp_path / "art.png")), decode_image(str(path), GREY_BG))


# ------------------------------------------------------------------------------------------------ case 9
def _copy_of_small_corpus(tmp_path: Path) -> Path:
    source, _ = small_emoji_corpus()
    root = tmp_path / "emoji"
    shutil.copytree(source, root)
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_on_error_is_a_data_config_key():
    """issue case 9: data.on_error is a config key (raise | skip) with one-line errors for other values."""
    assert load_run_config("pretrain_emoji").data.on_error == "raise"
    assert load_run_config("pretrain_emoji", overrides=["data.on_error=skip"]).data.on_error == "skip"
    with pytest.raises(ConfigError, match="data.on_error"):
        load_run_config("pretrain_emoji", overrides=["data.on_error=ignore"])


def test_truncated_image_with_exists_check_is_skipped_and_counted(tmp_path, caplog):
    """issue case 9: check_images="exists" + on_error="skip": a truncated image is dropped at cache build or load, counted."""
    root = _copy_of_small_corpus(tmp_path)
    records = json.loads((root / "pretrain.json").read_text())
    bad = root / records[1]["image"]
    _truncate(bad)
    with pytest.raises(AnnotationError, match="record 1: cannot decode"):
        PretrainDataset(root / "pretrain.json", image_size=32, check_images="exists", cache=True)
    with caplog.at_level(logging.WARNING):
        cached = PretrainDataset(root / "pretrain.json", image_size=32, check_images="exists", cache=True,
                                 on_error="skip")
    assert len(cached) == len(records) - 1 and cached.skipped["corrupt_image"] == 1
    assert str(bad) not in {r.image for r in cached.records}
    assert "could not be decoded when caching" in caplog.text
    # without a cache: found when the item is loaded; that item is made from the next record, counted once
    lazy = PretrainDataset(root / "pretrain.json", image_size=32, check_images="exists", cache=False,
                           on_error="skip")
    assert len(lazy) == len(records)
    items = lazy.load_items([0, 1, 2])
    assert [item["index"] for item in items] == [0, 1, 2] and items[1]["image_id"] == lazy.image_ids[2]
    lazy.load_items([1])
    assert lazy.skipped["corrupt_image_at_load"] == 1
    strict = PretrainDataset(root / "pretrain.json", image_size=32, check_images="exists", cache=False)
    with pytest.raises(AnnotationError, match="record 1: cannot decode"):
        strict.load_items([1])


def test_data_on_error_skip_reaches_the_trainer_and_is_reported(tmp_path, capsys):
    """issue case 9: --set data.on_error=skip trains past a truncated image and the start line gives the count."""
    from codis_lib.train.cli import pretrain_main

    root = _copy_of_small_corpus(tmp_path)
    records = json.loads((root / "pretrain.json").read_text())
    _truncate(root / records[3]["image"])
    overrides = tiny_run_overrides(tmp_path / "run", 2, **{"data.root": str(root)})
    argv = [item for value in overrides for item in ("--set", value)]
    assert pretrain_main(argv + ["--set", "data.on_error=skip"]) == 0
    out = capsys.readouterr().out
    assert f"{len(records) - 1} training samples (1 bad record(s) skipped, data.on_error=skip: corrupt_image 1)" in out


# ------------------------------------------------------------------------------------------------ case 12
def test_absolute_image_outside_the_root_is_named(tmp_path, caplog):
    """issue case 12: an absolute image path outside the image root is warned about (record named), or refused."""
    inside, outside = tmp_path / "data", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    for folder in (inside, outside):
        Image.new("RGB", (4, 4), (9, 9, 9)).save(folder / "x.png")
    annotation = inside / "test.json"
    annotation.write_text(json.dumps([{"image": "x.png", "caption": ["in"]},
                                      {"image": str(outside / "x.png"), "caption": ["out"]},
                                      {"image": str(inside / "x.png"), "caption": ["in too"]},
                                      {"image": "../elsewhere/x.png", "caption": ["out too"]}]))
    with caplog.at_level(logging.WARNING):
        result = read_retrieval_eval(annotation)
    assert len(result) == 4
    assert "2 record(s) name an image outside the image root" in caplog.text and "record 1" in caplog.text
    with pytest.raises(AnnotationError, match=r"record 1: image .* is outside the image root"):
        read_retrieval_eval(annotation, outside_root="raise")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_retrieval_eval(annotation, outside_root="allow")
        absolute = tmp_path / "absolute.json"
        absolute.write_text(json.dumps([{"image": str(folder / "x.png"), "caption": ["x"]} for folder in (inside, outside)]))
        read_retrieval_eval(absolute, image_root=tmp_path)  # both folders are under this root
    assert "outside the image root" not in caplog.text


# ------------------------------------------------------------------------------------------------ case 10
def test_run_folder_config_records_the_vocab_size_used(tmp_path):
    """issue case 10: config.yaml in the run folder records the tokenizer's vocab_size, not the placeholder."""
    from codis_lib.data.tokenizer import load_tokenizer
    from codis_lib.train.cli import pretrain_main

    root, _ = small_emoji_corpus()
    overrides = tiny_run_overrides(tmp_path / "run", 1, **{"model.text.vocab_size": 9999})
    assert pretrain_main([item for value in overrides for item in ("--set", value)]) == 0
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    tokenizer = load_tokenizer(root / "tokenizer")
    assert recorded["model"]["text"]["vocab_size"] == len(tokenizer) != 9999
    assert recorded["model"]["text"]["mask_token_id"] == tokenizer.mask_token_id
