"""Style variants of the training images (data.style_variants): fixed re-drawings that keep the emoji."""
import colorsys
import contextlib
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from codis_lib.data.datasets import PretrainDataset, decode_image
from codis_lib.data.style_variants import (COLOUR_CHANGING, EDGE_THRESHOLD, NEAR_WHITE, STYLE_VARIANTS,
                                           apply_style, background_colour, background_mask, hue_angle,
                                           names_colour, style_tensor, style_variant_grid)
from codis_lib.run_config import STYLE_VARIANT_NAMES, ConfigError, load_run_config
from tests.fixtures_data.corpus import small_emoji_corpus


def _corpus():
    root, _ = small_emoji_corpus()
    return root / "pretrain.json", json.loads((root / "pretrain.json").read_text())


def _drawings(count: int = 8) -> list[Image.Image]:
    """Real emoji drawings of the small corpus (32 px on white), spread over the file."""
    path, records = _corpus()
    step = max(1, len(records) // count)
    return [Image.open(path.parent / r["image"]).convert("RGB") for r in records[::step][:count]]


def _ring() -> Image.Image:
    """A white canvas with a black ring around white, a red dot and a blue square: enclosed white, two colours."""
    pixels = np.full((32, 32, 3), 255, dtype=np.uint8)
    pixels[4:28, 4:28] = 0
    pixels[7:25, 7:25] = 255  # white inside the ring: part of the drawing, not background
    pixels[12:16, 12:16] = (220, 30, 30)
    pixels[16:20, 16:20] = (30, 60, 220)
    return Image.fromarray(pixels, "RGB")


def test_the_names_agree_with_the_config_layer():
    assert STYLE_VARIANTS == STYLE_VARIANT_NAMES == ("grayscale", "hue", "outline", "flat", "background")
    assert COLOUR_CHANGING <= set(STYLE_VARIANTS)


@pytest.mark.parametrize("name", STYLE_VARIANTS)
def test_every_style_is_a_fixed_function_of_the_image_that_changes_it_and_keeps_its_size(name):
    for image in _drawings() + [_ring()]:
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        first = style_tensor(name, torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        random.seed(2), np.random.seed(2), torch.manual_seed(2)  # no global generator is drawn from
        again = style_tensor(name, torch.from_numpy(np.asarray(image.copy()).copy()).permute(2, 0, 1))
        assert first.dtype == torch.uint8 and first.shape == (3, image.height, image.width)
        assert torch.equal(first, again)
        styled = apply_style(name, image)
        assert styled.mode == "RGB" and styled.size == image.size
        assert not np.array_equal(np.asarray(styled), np.asarray(image)), name


def test_grayscale_is_the_luminance_stretched_to_the_full_range():
    for image in _drawings():
        grey = np.asarray(apply_style("grayscale", image)).astype(int)
        assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
        assert grey.min() == 0 and grey.max() == 255
        luminance = np.asarray(image.convert("L")).ravel()
        order = np.argsort(luminance, kind="stable")
        assert (np.diff(grey[..., 0].ravel()[order]) >= 0).all()  # a lighter pixel never comes out darker


def test_hue_turns_colours_by_the_images_own_angle_and_keeps_greys():
    angles = {hue_angle(image) for image in _drawings()}
    assert all(90 <= a <= 270 for a in angles) and len(angles) > 1
    ring = _ring()
    turned = np.asarray(apply_style("hue", ring))
    source = np.asarray(ring)
    grey = (source == source[..., :1]).all(axis=-1)
    assert np.array_equal(turned[grey], source[grey])  # black and white untouched
    for y, x in ((13, 13), (17, 17)):  # the red dot and the blue square
        before = colorsys.rgb_to_hsv(*(source[y, x] / 255))[0] * 360
        after = colorsys.rgb_to_hsv(*(turned[y, x] / 255))[0] * 360
        assert abs((after - before - hue_angle(ring) + 180) % 360 - 180) < 4


def _input_edges(pixels: np.ndarray) -> np.ndarray:
    """(H, W): True where a pixel and one of its 4-neighbours differ by EDGE_THRESHOLD or more in a channel."""
    height, width, _ = pixels.shape
    values = pixels.astype(int)
    edges = np.zeros((height, width), dtype=bool)
    for y in range(height):
        for x in range(width):
            for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    edges[y, x] |= np.abs(values[y, x] - values[y + dy, x + dx]).max() >= EDGE_THRESHOLD
    return edges


def test_outline_draws_dark_strokes_only_where_colours_meet():
    for image in _drawings(4) + [_ring()]:
        page = np.asarray(apply_style("outline", image))
        assert (page[..., 0] == page[..., 1]).all() and (page[..., 1] == page[..., 2]).all()  # ink on paper
        dark = page[..., 0] < 128
        edges = _input_edges(np.asarray(image))
        assert dark.any() and not (dark & ~edges).any()
        assert (page[..., 0][~edges] == 255).all()  # away from the edges: white paper
    page = np.asarray(apply_style("outline", _ring()))[..., 0]
    assert page[15, 13] < 128 and page[16, 17] < 128  # the red-blue boundary is drawn (both sides)
    assert page[10, 20] == 255  # the middle of the white inside the ring is paper


def test_flat_posterizes_keeps_white_and_softens():
    for image in _drawings():
        flat = np.asarray(apply_style("flat", image)).astype(int)
        source = np.asarray(image).astype(int)
        white_around = np.ones(source.shape[:2], dtype=bool)  # pixels whose 5 x 5 neighbourhood is all white
        padded = np.pad((source == 255).all(axis=-1), 2, constant_values=True)
        for dy in range(5):
            for dx in range(5):
                white_around &= padded[dy:dy + source.shape[0], dx:dx + source.shape[1]]
        assert (flat[white_around] == 255).all()
        levels = np.round(source / 85) * 85
        assert np.abs(flat - levels).mean() < np.abs(source - levels).mean() + 8  # near the 4 levels, blurred
        assert len(np.unique(flat.reshape(-1, 3), axis=0)) > 1


def test_background_paints_only_the_white_around_the_drawing():
    for image in _drawings() + [_ring()]:
        source = np.asarray(image)
        painted = np.asarray(apply_style("background", image))
        mask = background_mask(image)
        colour = background_colour(image)
        assert mask.any() and min(colour) < NEAR_WHITE - 40  # a pastel, never near-white
        assert (painted[mask] == colour).all()
        assert np.array_equal(painted[~mask], source[~mask])  # the drawing untouched, pixel for pixel
        assert not mask[~(source >= NEAR_WHITE).all(axis=-1)].any()  # no coloured pixel is background
    ring_mask = background_mask(_ring())
    assert ring_mask[0, 0] and not ring_mask[10, 10]  # white enclosed by the ring stays white
    assert len({background_colour(image) for image in _drawings()}) > 1


def test_bad_names_and_modes_are_one_line_errors_naming_them():
    with pytest.raises(ValueError, match=r"unknown style variant 'sepia'; valid: grayscale, hue, outline, flat, "
                                         r"background"):
        apply_style("sepia", _ring())
    with pytest.raises(ValueError, match="expected an RGB image, got mode L"):
        apply_style("hue", _ring().convert("L"))
    grid = style_variant_grid(_drawings(2), ["grayscale", "outline"])
    assert grid.size == (3 * 32, 2 * 32)


def _generators(count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(7 + k) for k in range(count)]


def _dataset(**options) -> PretrainDataset:
    path, _ = _corpus()
    return PretrainDataset(path, image_size=32, augment=False, cache=True, check_images="exists", **options)


def test_the_dataset_shows_each_record_then_each_style_with_the_records_captions_and_image_id():
    plain = _dataset()
    styled = _dataset(style_variants=("grayscale", "outline"))
    records = len(plain.records)
    colour_named = [r for r in range(records) if names_colour(plain.records[r].captions)]
    assert 0 < len(colour_named) < records  # the small corpus has "red heart" and the like
    assert len(styled) == records + (records - len(colour_named)) + records
    for index, (record, style) in enumerate(zip(styled.variants.record, styled.variants.style)):
        expected_style = None if index < records else ("grayscale" if index < len(styled) - records else "outline")
        assert style == expected_style
        if style == "grayscale":
            assert record not in colour_named
    indices = [0, 5, records + 3, len(styled) - 1, len(styled) - records]
    items = styled.load_items(indices, _generators(len(indices)))
    for index, item in zip(indices, items):
        record = styled.variants.record[index]
        assert item["index"] == index and item["image_id"] == plain.image_ids[record]
        assert item["caption"] in plain.records[record].captions
        original = decode_image(str(plain.records[record].image))
        style = styled.variants.style[index]
        source = original if style is None else style_tensor(style, original)
        assert torch.equal(item["image"], styled.transform.batch([source], [item["caption"]], None)[0][0])
    # the variant of a record draws its caption from the record's captions, exactly as the original does
    again = plain.load_items([styled.variants.record[i] for i in indices], _generators(len(indices)))
    assert [item["caption"] for item in items] == [item["caption"] for item in again]


def test_the_original_block_is_todays_dataset_and_caching_changes_nothing():
    plain = _dataset()
    styled = _dataset(style_variants=list(STYLE_VARIANTS))
    records = len(plain.records)
    indices = list(range(0, records, 3))
    for mine, today in zip(styled.load_items(indices, _generators(len(indices))),
                           plain.load_items(indices, _generators(len(indices)))):
        assert mine.keys() == today.keys() and mine["caption"] == today["caption"]
        assert torch.equal(mine["image"], today["image"]) and mine["image_id"] == today["image_id"]
    assert len(plain) == records and plain.variants is None
    uncached = PretrainDataset(_corpus()[0], image_size=32, augment=False, cache=False,
                               style_variants=list(STYLE_VARIANTS))
    everywhere = list(range(0, len(styled), 7))
    for cached, drawn in zip(styled.load_items(everywhere, _generators(len(everywhere))),
                             uncached.load_items(everywhere, _generators(len(everywhere)))):
        assert torch.equal(cached["image"], drawn["image"]) and cached["caption"] == drawn["caption"]
    with pytest.raises(ValueError, match=r"style_variants: unknown style variant 'sepia'"):
        _dataset(style_variants=["sepia"])
    with pytest.raises(ValueError, match=r"style_variants: 'hue' is listed twice"):
        _dataset(style_variants=["hue", "hue"])


@pytest.mark.parametrize("value, problem", [
    ("[sepia]", "data.style_variants: unknown style 'sepia'; valid: grayscale, hue, outline, flat, background"),
    ("[hue, outline, hue]", "data.style_variants: 'hue' is listed twice"),
    ("grayscale", "data.style_variants must be a list, got 'grayscale'"),
])
def test_the_config_key_is_checked_in_one_line_naming_it(value, problem):
    with pytest.raises(ConfigError) as error:
        load_run_config("pretrain_emoji", overrides=[f"data.style_variants={value}"], world_size=1)
    lines = [line.strip() for line in str(error.value).splitlines() if "style_variants" in line]
    assert len(lines) == 1 and problem in lines[0]


def test_the_config_key_defaults_to_none_and_is_for_pretraining_only():
    assert load_run_config("pretrain_emoji", world_size=1).data.style_variants == []
    run = load_run_config("pretrain_emoji", overrides=["data.style_variants=[grayscale, background]"], world_size=1)
    assert run.data.style_variants == ["grayscale", "background"]
    with pytest.raises(ConfigError, match=r"data\.style_variants: style variants are for pretraining"):
        load_run_config("finetune_emoji", overrides=["data.style_variants=[grayscale]"], world_size=1)


def test_a_tiny_run_with_a_style_trains_and_its_trunk_sees_each_image_once(tmp_path, monkeypatch, one_thread):
    from codis_lib.model.efficientnet import EfficientNetTokens
    from codis_lib.train.cli import pretrain_main
    from tests.helpers import tiny_run_overrides

    seen = []
    trunk = EfficientNetTokens.trunk
    monkeypatch.setattr(EfficientNetTokens, "trunk", lambda self, image: seen.append(len(image)) or trunk(self, image))
    overrides = tiny_run_overrides(tmp_path, 1000, **{"data.style_variants": "[grayscale]", "train.epochs": 2})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert pretrain_main([a for value in overrides for a in ("--set", value)]) == 0, printed.getvalue()[-2000:]
    styled = _dataset(style_variants=["grayscale"])
    assert f"{len(styled)} training samples" in printed.getvalue()
    steps = len(styled) // 8 * 2  # two epochs of whole batches of 8
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in metrics) == steps
    # every distinct image through the trunk once: the second epoch is all cache hits
    assert 0 < sum(seen) <= len(styled) < steps * 8
    checkpoint = torch.load(tmp_path / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    saved = checkpoint["data_order"]
    assert saved["style_variants"] == ["grayscale"]
    from codis_lib.train.data_order import data_order_changes

    assert data_order_changes(saved, saved) == []  # a resume with the same list goes on; another list is refused
    assert data_order_changes(saved, {**saved, "style_variants": ["outline"]}) == \
        ["data.style_variants ['grayscale'] -> ['outline']"]
