"""Transforms: ALBEF's RandomAugment ops against PIL, crop/flip/normalise, and left/right-aware flipping."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from codis_lib.data.transforms import (
    ALBEF_RANDAUG_OPS,
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    RandomAugment,
    TrainTransform,
    build_transform,
    decide_flip,
    mentions_side,
    normalize,
    random_resized_crop_box,
    resize_square,
    resized_crop,
    swap_sides,
    warp_affine,
)


def _photo_like(size=48, seed=0) -> torch.Tensor:
    """A smooth random colour image (3, H, W) uint8: resampling differences stay small on it."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 6, generator=g) * 200 + 20
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)[0].round().to(torch.uint8)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


# ---------------------------------------------------------------------------------------------
# Left / right


@pytest.mark.parametrize("caption, mentions, swapped", [
    ("left arrow", True, "right arrow"),
    ("Right-facing fist", True, "Left-facing fist"),
    ("right arrow curving left", True, "left arrow curving right"),
    ("leftwards hand", True, "rightwards hand"),
    ("person running facing right", True, "person running facing left"),
    ("left luggage", False, "left luggage"),  # the name of a thing, not a side
    ("a bright light", False, "a bright light"),  # 'right' inside a word does not count
    ("red heart", False, "red heart"),
])
def test_side_words(caption, mentions, swapped):
    assert mentions_side(caption) is mentions
    assert swap_sides(caption) == swapped


def test_flip_policies():
    g = torch.Generator().manual_seed(0)
    skip = [decide_flip("left arrow", "skip", g) for _ in range(200)]
    assert not any(flip for flip, _ in skip) and {c for _, c in skip} == {"left arrow"}
    plain = [decide_flip("red heart", "skip", g)[0] for _ in range(400)]
    assert 150 < sum(plain) < 250  # other captions flip half of the time
    swap = [decide_flip("left arrow", "swap", g) for _ in range(200)]
    assert {c for flip, c in swap if flip} == {"right arrow"} and {c for flip, c in swap if not flip} == {"left arrow"}
    ignore = [decide_flip("left arrow", "ignore", g) for _ in range(200)]
    assert any(flip for flip, _ in ignore) and {c for _, c in ignore} == {"left arrow"}
    with pytest.raises(ValueError, match="flip_policy"):
        decide_flip("x", "sometimes", g)


def _left_red_right_blue(size=32) -> torch.Tensor:
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    image[0, :, : size // 2] = 255
    image[2, :, size // 2:] = 255
    return image


@pytest.mark.parametrize("policy", ["skip", "swap", "ignore"])
def test_train_transform_keeps_picture_and_caption_consistent(policy):
    transform = TrainTransform(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaugment=False, flip_policy=policy)
    g = torch.Generator().manual_seed(1)
    outcomes = set()
    for _ in range(60):
        image, caption = transform(_left_red_right_blue(), "red on the left", generator=g)
        red_on_left = image[0, :, :16].mean() > image[0, :, 16:].mean()
        outcomes.add((bool(red_on_left), caption))
    expected = {
        "skip": {(True, "red on the left")},
        "swap": {(True, "red on the left"), (False, "red on the right")},
        "ignore": {(True, "red on the left"), (False, "red on the left")},  # ALBEF: the caption may lie
    }[policy]
    assert outcomes == expected


# ---------------------------------------------------------------------------------------------
# Deterministic parts


def test_normalise_uses_clip_constants():
    white = torch.full((3, 4, 4), 255, dtype=torch.uint8)
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(normalize(white)[:, 0, 0], expected)
    batch = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    assert torch.allclose(normalize(batch)[1, :, 2, 2], torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]))


def test_augment_false_is_the_eval_transform_and_deterministic():
    image = _photo_like(48)
    off = TrainTransform(32, augment=False)
    a, caption = off(image, "left arrow")
    b, _ = off(image, "left arrow")
    assert caption == "left arrow" and torch.equal(a, b) and a.shape == (3, 32, 32)
    assert torch.equal(a, EvalTransform(32)(image))


def test_eval_transform_resize_matches_pil_bicubic():
    image = _photo_like(48)
    ours = EvalTransform(32)(image)
    reference = normalize(_tensor(_pil(image).resize((32, 32), Image.BICUBIC)))
    assert (ours - reference).abs().max() < 2.0 / 255 / min(CLIP_STD)  # within 2 grey levels of PIL


def test_crop_box_and_resized_crop():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        top, left, h, w = random_resized_crop_box(64, 48, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 48
        assert 0.19 * 64 * 48 <= h * w <= 64 * 48 and 0.7 <= w / h <= 1.4
    image = _photo_like(48)
    crop = resized_crop(image, (8, 4, 30, 20), 16)
    reference = _tensor(_pil(image).resize((16, 16), Image.BICUBIC, box=(4, 8, 24, 38)))
    assert crop.shape == (3, 16, 16) and crop.dtype == torch.uint8
    assert (crop.float() - reference).abs().mean() < 1.5


def test_train_transform_output_and_reproducibility():
    transform = build_transform("pretrain", 32)
    image = _photo_like(32)
    a, _ = transform(image, "x", generator=torch.Generator().manual_seed(5))
    b, _ = transform(image, "x", generator=torch.Generator().manual_seed(5))
    c, _ = transform(image, "x", generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert build_transform("train", 32).crop_scale == (0.5, 1.0)  # ALBEF's retrieval fine-tuning crop
    with pytest.raises(ValueError, match="kind"):
        build_transform("test", 32)


def test_build_transform_takes_the_data_sections_augmentation_keys():
    light = build_transform("pretrain", 32, crop_scale=(0.8, 1.0), randaugment_ops=0)
    assert light.crop_scale == (0.8, 1.0) and light.randaugment is None
    strong = build_transform("pretrain", 32, randaugment_ops=3, randaugment_magnitude=5)
    assert strong.crop_scale == (0.2, 1.0) and strong.randaugment is not None
    assert (strong.randaugment.num_ops, strong.randaugment.magnitude) == (3, 5.0)
    # with RandAugment off, a full-area square crop of a caption that forbids flipping is the plain resize
    image = _photo_like(32)
    plain = TrainTransform(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaugment=False, flip_policy="skip")
    for seed in range(4):
        assert torch.equal(plain(image, "left hand", generator=torch.Generator().manual_seed(seed))[0],
                           EvalTransform(32)(image))


# ---------------------------------------------------------------------------------------------
# RandomAugment ops against PIL (ALBEF's numpy versions reproduce PIL's)


def test_randaugment_magnitudes_follow_albef():
    ra = RandomAugment(2, 7, image_size=256)
    assert ra.enhance_factor == pytest.approx(1.36) and ra.shear == pytest.approx(0.21)
    assert ra.rotate_degrees == pytest.approx(21.0) and ra.translate_pixels == pytest.approx(7.0)
    assert RandomAugment(2, 7, image_size=64).translate_pixels == pytest.approx(1.75)  # scaled to the image
    assert ra.ops == ALBEF_RANDAUG_OPS
    with pytest.raises(ValueError, match="Solarise"):
        RandomAugment(ops=["Solarise"])


@pytest.mark.parametrize("op, reference, tolerance", [
    ("Equalize", lambda im: ImageOps.equalize(im), 0.0),
    ("AutoContrast", lambda im: ImageOps.autocontrast(im), 1.0),
    ("Brightness", lambda im: ImageEnhance.Brightness(im).enhance(1.36), 1.0),
    ("Sharpness", lambda im: ImageEnhance.Sharpness(im).enhance(1.36), 1.0),
])
def test_colour_ops_match_pil(op, reference, tolerance):
    image = _photo_like(40, seed=3)
    ours = RandomAugment(2, 7).apply(image.float(), op, 1.0)
    expected = _tensor(reference(_pil(image)))
    assert (ours - expected).abs().max() <= tolerance


def test_translate_is_an_exact_shift_with_grey_fill():
    image = _photo_like(32).float()
    ra = RandomAugment(2, 10, image_size=256)  # level 10: 10 pixels
    shifted = ra.apply(image, "TranslateX", 1.0)  # ALBEF: M = [[1, 0, -offset], [0, 1, 0]]: content moves left
    assert torch.equal(shifted[:, :, :22], image[:, :, 10:])
    assert (shifted[:, :, 22:] == 128).all()
    down = ra.apply(image, "TranslateY", -1.0)
    assert torch.equal(down[:, 10:, :], image[:, :22, :]) and (down[:, :10, :] == 128).all()


def test_rotate_and_shear_match_pil_geometry():
    image = _photo_like(48, seed=1)
    ra = RandomAugment(2, 7)
    rotated = ra.apply(image.float(), "Rotate", 1.0)  # 21 degrees counter-clockwise
    expected = _tensor(_pil(image).rotate(21, resample=Image.BILINEAR, fillcolor=(128, 128, 128)))
    inner = (slice(None), slice(12, 36), slice(12, 36))  # away from the border, where the half-pixel centre shows
    assert (rotated[inner] - expected[inner]).abs().mean() < 3.0
    assert (rotated[:, 0, 0] == 128).all()  # corners come from outside: grey
    sheared = ra.apply(image.float(), "ShearX", 1.0)  # output (x, y) takes source (x - 0.21 y, y)
    expected = _tensor(_pil(image).transform((48, 48), Image.AFFINE, (1, -0.21, 0, 0, 1, 0),
                                             resample=Image.BILINEAR, fillcolor=(128, 128, 128)))
    assert (sheared[:, :, 16:] - expected[:, :, 16:]).abs().mean() < 3.0


def test_warp_identity_and_randaugment_dtype():
    image = _photo_like(20).float()
    assert torch.allclose(warp_affine(image, ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))), image, atol=1e-3)
    ra = RandomAugment(2, 7, prob=1.0)
    out = ra(_photo_like(20), generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == (3, 20, 20)
    g = torch.Generator().manual_seed(0)
    changed = sum(not torch.equal(ra(_photo_like(20), generator=g), _photo_like(20)) for _ in range(20))
    assert changed >= 15  # with prob 1 only Identity twice leaves the image alone


@pytest.mark.parametrize("shape", [(40, 44), (64, 64), (20, 90), (100, 120)])
def test_matrix_resize_equals_pytorch_antialiased_bicubic(shape):
    image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = resize_square(image, 48, as_float=True)
    reference = torch.nn.functional.interpolate(image[None].float(), size=(48, 48), mode="bicubic", antialias=True,
                                                align_corners=False)[0].clamp(0, 255)
    assert (ours - reference).abs().max() < 1e-3
    assert torch.allclose(resize_square(image, 48, as_float=True, flip=True), ours.flip(-1), atol=1e-4)


@pytest.mark.parametrize("op", [op for op in ALBEF_RANDAUG_OPS if op != "Identity"])
def test_randaugment_ops_on_a_batch_equal_one_image_at_a_time(op):
    images = torch.stack([_photo_like(24, seed=s) for s in range(4)]).float()  # (4, 3, 24, 24)
    ra = RandomAugment(2, 7, image_size=24)
    together = ra.apply(images, op, -1.0)
    one_by_one = torch.stack([ra.apply(image, op, -1.0) for image in images])
    assert torch.equal(together, one_by_one)


def test_batch_transform_draws_per_image_and_keeps_captions_paired():
    transform = TrainTransform(24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaugment=False, flip_policy="swap")
    images = [_left_red_right_blue(24)] * 64
    out, captions = transform.batch(images, ["red on the left"] * 64, generator=torch.Generator().manual_seed(3))
    assert out.shape == (64, 3, 24, 24)
    red_left = out[:, 0, :, :12].mean(dim=(1, 2)) > out[:, 0, :, 12:].mean(dim=(1, 2))
    assert 16 < int(red_left.sum()) < 48  # each image draws its own flip
    assert captions == ["red on the left" if left else "red on the right" for left in red_left.tolist()]
    full = TrainTransform(24)
    batch, _ = full.batch([_photo_like(24, seed=s) for s in range(8)], [None] * 8, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (8, 3, 24, 24) and torch.isfinite(batch).all()
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        full.batch([_photo_like(24)] * 2, ["x"])


def test_batch_with_a_generator_per_image_equals_one_image_at_a_time():
    transform = TrainTransform(24, flip_policy="swap")
    images = [_photo_like(24 + 4 * s, seed=s) for s in range(12)]
    captions = ["an arrow pointing left", "red on the right", "a chick", None] * 3
    one_by_one = [transform(image, caption, torch.Generator().manual_seed(100 + s))
                  for s, (image, caption) in enumerate(zip(images, captions))]
    together, paired = transform.batch(images, captions, [torch.Generator().manual_seed(100 + s) for s in range(12)])
    for row, (image, caption) in enumerate(one_by_one):
        assert torch.equal(together[row], image) and paired[row] == caption
    assert paired != captions  # some flip swapped a side word: the flips were drawn, not all skipped
    with pytest.raises(ValueError, match="1 generators for 2 images"):
        transform.batch(images[:2], captions[:2], [torch.Generator()])
