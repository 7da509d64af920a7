"""Image transforms of docs/METHOD.md on uint8 tensors, with the horizontal flip kept consistent with the caption.

Training (ALBEF's ``pretrain_transform`` / ``train_transform``, salesforce/ALBEF ``dataset/__init__.py``):
RandomResizedCrop (scale 0.2-1 in pretraining, 0.5-1 in retrieval fine-tuning, bicubic),
horizontal flip, ALBEF's RandomAugment (2 ops drawn from Identity, AutoContrast, Equalize,
Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Rotate; each applied with
probability 0.5 at magnitude 7 of 10; grey fill 128), then CLIP's normalisation constants.
Evaluation: bicubic resize to a square, normalise. RandomAugment lives in
:mod:`codis_lib.data.randaugment` (re-exported here).

Everything works on ``(3, H, W)`` uint8 tensors (decoded once by the in-memory cache) rather than
PIL images, so that a CPU is not spent converting; ``augment=False`` turns a training transform
into the deterministic evaluation one (used by training-invariance tests).

The flip and the caption: a mirrored picture of "left arrow" is a right arrow. ``flip_policy``
says what to do when the caption mentions a side: "skip" (default) leaves such samples
unflipped; "swap" flips and swaps left <-> right words in the caption (except in fixed phrases
such as "left luggage"); "ignore" flips regardless, as ALBEF does.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F

from codis_lib.data.decode import WHITE, pil_to_rgb_array
from codis_lib.data.randaugment import (  # noqa: F401  (re-exported: RandomAugment used to live here)
    ALBEF_RANDAUG_OPS,
    GEOMETRIC_OPS,
    Generators,
    RandomAugment,
    affine_sampling_grid,
    warp_affine,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FLIP_POLICIES = ("skip", "swap", "ignore")
_SIDE_WORDS = {"left": "right", "right": "left", "leftwards": "rightwards", "rightwards": "leftwards",
               "leftward": "rightward", "rightward": "leftward"}
_SIDE_PATTERN = re.compile(r"\b(" + "|".join(sorted(_SIDE_WORDS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
# Phrases where "left"/"right" names a thing, not a side (a flipped drawing does not change them).
FIXED_SIDE_PHRASES = ("left luggage",)


def mentions_side(caption: str) -> bool:
    """Return True if the caption has a left/right word outside the fixed phrases."""
    text = caption.lower()
    for phrase in FIXED_SIDE_PHRASES:
        text = text.replace(phrase, " ")
    return _SIDE_PATTERN.search(text) is not None


def swap_sides(caption: str) -> str:
    """Return the caption with left <-> right (leftwards <-> rightwards, ...) swapped, fixed phrases untouched."""
    lowered = caption.lower()
    protected = []
    for phrase in FIXED_SIDE_PHRASES:
        start = lowered.find(phrase)
        while start != -1:
            protected.append((start, start + len(phrase)))
            start = lowered.find(phrase, start + 1)

    def replace(match: re.Match) -> str:
        if any(a <= match.start() < b for a, b in protected):
            return match.group(0)
        word = match.group(0)
        swapped = _SIDE_WORDS[word.lower()]
        return swapped.capitalize() if word[0].isupper() else swapped

    return _SIDE_PATTERN.sub(replace, caption)


def decide_flip(caption: str | None, policy: str, generator: torch.Generator | None = None) -> tuple[bool, str | None]:
    """Return (whether to mirror the image, the caption to pair with it) under ``policy``; flips with probability 1/2."""
    if policy not in FLIP_POLICIES:
        raise ValueError(f"flip_policy={policy!r}: expected one of {FLIP_POLICIES}")
    coin = bool(torch.rand((), generator=generator) < 0.5)
    if not coin or caption is None or policy == "ignore" or not mentions_side(caption):
        return coin, caption
    if policy == "skip":
        return False, caption
    return True, swap_sides(caption)


def to_uint8_tensor(image, background: Sequence[int] = WHITE) -> torch.Tensor:
    """Return a (3, H, W) uint8 tensor from a PIL image of any mode or a (3, H, W) uint8 tensor.

    PIL images go through `codis_lib.data.decode.pil_to_rgb_array`: 16-bit grey scaled to 8 bits,
    transparency composited on ``background`` (white, the emoji corpus's), every mode exactly.
    """
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
        return image
    rgb = pil_to_rgb_array(image, background)  # (H, W, 3)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


class Normalizer:
    """Callable (x / 255 - mean) / std for uint8 or [0, 255]-float images, (3, H, W) or (B, 3, H, W); returns float."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)  # (3, 1, 1)
        self.bias = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t  # (3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, image.float(), self.scale)  # one fused op: per-op overhead dominates at 64 px


def normalize(image: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Return the float image (x / 255 - mean) / std; works on (3, H, W) or (B, 3, H, W), uint8 or float in [0, 255]."""
    return Normalizer(mean, std)(image)


_MATRIX_RESIZE_MAX_RATIO = 2  # above this shrink factor a dense weight matrix costs more than F.interpolate


@functools.lru_cache(maxsize=1024)
def bicubic_resize_matrix(length: int, size: int, flip: bool = False) -> torch.Tensor:
    """Return the (size, length) matrix that resizes one axis bicubically, antialiased as PIL and PyTorch do.

    PIL's bicubic (a = -0.5) evaluated at output pixel centres, its support widened by the shrink
    factor when shrinking, weights normalised to sum 1 and restricted to the input: the same
    weights as ``F.interpolate(mode="bicubic", antialias=True)``. ``flip=True`` mirrors the output.
    Cached: a 64-px corpus needs at most 64 of them per side, and two matmuls with them are
    several times cheaper than one F.interpolate call at this size.
    """
    scale = length / size
    support_scale = max(scale, 1.0)
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) * scale  # (size,) in input pixel units
    distance = ((torch.arange(length, dtype=torch.float64) + 0.5)[None, :] - centres[:, None]).abs() / support_scale
    a = -0.5
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = (((distance - 5) * distance + 8) * distance - 4) * a
    weights = torch.where(distance < 1, near, torch.where(distance < 2, far, torch.zeros(())))  # (size, length)
    weights = weights / weights.sum(dim=1, keepdim=True)
    if flip:
        weights = weights.flip(0)
    return weights.float().contiguous()


def resize_square(image: torch.Tensor, size: int, *, as_float: bool = False, flip: bool = False) -> torch.Tensor:
    """Return the image resized to (size, size), bicubic, antialiased; uint8, or float in [0, 255] if ``as_float``.

    ``flip=True`` also mirrors it left-right (free: it is folded into the resize weights).
    """
    height, width = image.shape[-2:]
    if (height, width) == (size, size) and not flip:
        out = image.float() if as_float else image
        return out
    if max(height, width) <= _MATRIX_RESIZE_MAX_RATIO * size:
        rows = bicubic_resize_matrix(height, size)  # (S, h)
        cols = bicubic_resize_matrix(width, size, flip)  # (S, w)
        out = torch.matmul(torch.matmul(rows, image.float()), cols.T).clamp_(0, 255)  # (3, S, S)
    else:
        out = F.interpolate(image.unsqueeze(0).float(), size=(size, size), mode="bicubic", antialias=True,
                            align_corners=False).squeeze(0).clamp_(0, 255)
        if flip:
            out = out.flip(-1)
    return out if as_float else out.round_().to(torch.uint8)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """Return (top, left, h, w) of a random crop as torchvision's RandomResizedCrop draws it (10 tries, then centre)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    draws = torch.rand(10, 4, generator=generator).tolist()  # one call: per-call overhead dominates at 64 px
    for u_scale, u_ratio, u_top, u_left in draws:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int, *, as_float: bool = False,
                 flip: bool = False) -> torch.Tensor:
    """Return the crop ``box`` of a (3, H, W) image resized to (size, size), bicubic, optionally mirrored (see resize_square)."""
    top, left, h, w = box
    return resize_square(image[:, top:top + h, left:left + w], size, as_float=as_float, flip=flip)


# ----------------------------------------------------------------------------------------------
# The transforms the datasets use


class EvalTransform:
    """Bicubic resize to (image_size, image_size) and CLIP normalisation; returns float (3, S, S)."""

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.normalize = Normalizer(mean, std)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size})"

    def __call__(self, image, caption: str | None = None, generator: torch.Generator | None = None):
        tensor = self.normalize(resize_square(to_uint8_tensor(image), self.image_size))
        return tensor if caption is None else (tensor, caption)

    def batch(self, images: Sequence, captions: Sequence[str | None] | None = None,
              generator: torch.Generator | None = None):
        """Return (B, 3, S, S) float for a list of images (and the captions unchanged, if given)."""
        out = self.normalize(torch.stack([resize_square(to_uint8_tensor(img), self.image_size) for img in images]))
        return out if captions is None else (out, list(captions))


class TrainTransform:
    """Training transform of docs/METHOD.md: crop, caption-aware flip, RandomAugment, normalise; returns (float (3, S, S), caption).

    ``augment=False`` gives the evaluation transform (resize + normalise, no randomness).
    ``crop_scale`` is (0.2, 1.0) for pretraining and (0.5, 1.0) for retrieval fine-tuning, as ALBEF.
    ``batch`` transforms a list of images at once (the datasets' batched loading uses it): a
    fraction of the per-call overhead at 64 px. Given one generator per image, each image's
    output is the one a batch of one would give under that generator, whatever the batch.
    """

    def __init__(self, image_size: int, *, augment: bool = True, crop_scale: tuple[float, float] = (0.2, 1.0),
                 crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), randaugment: bool = True,
                 randaugment_ops: int = 2, randaugment_magnitude: float = 7, flip_policy: str = "skip",
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if flip_policy not in FLIP_POLICIES:
            raise ValueError(f"flip_policy={flip_policy!r}: expected one of {FLIP_POLICIES}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={crop_scale}: expected 0 < low <= high <= 1")
        self.image_size, self.augment = image_size, augment
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.flip_policy = flip_policy
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalize = Normalizer(mean, std)
        self.randaugment = (RandomAugment(randaugment_ops, randaugment_magnitude, image_size=image_size)
                            if augment and randaugment else None)

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, augment={self.augment}, crop_scale={self.crop_scale}, "
                f"flip_policy={self.flip_policy!r}, randaugment={self.randaugment})")

    def __call__(self, image, caption: str | None = None, generator: torch.Generator | None = None):
        images, captions = self.batch([image], [caption], generator)
        return images[0], captions[0]

    def batch(self, images: Sequence, captions: Sequence[str | None], generator: Generators = None):
        """Return ((B, 3, S, S) float, captions) for lists of images (PIL or uint8 (3, H, W)) and captions.

        ``generator``: one for the whole batch (None: torch's global one), or a sequence of one per
        image from which that image draws its crop, flip and RandomAugment, in that order.
        """
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        per_image = generator is not None and not isinstance(generator, torch.Generator)
        if per_image and len(generator) != len(images):
            raise ValueError(f"{len(generator)} generators for {len(images)} images")
        size = self.image_size
        if not self.augment:
            out = torch.stack([resize_square(to_uint8_tensor(img), size) for img in images])
            return self.normalize(out), list(captions)
        out = torch.empty(len(images), 3, size, size)  # float in [0, 255] until normalised
        paired_captions = []
        for row, (image, caption) in enumerate(zip(images, captions)):
            pixels, draw_from = to_uint8_tensor(image), generator[row] if per_image else generator
            box = random_resized_crop_box(pixels.shape[1], pixels.shape[2], self.crop_scale, self.crop_ratio, draw_from)
            flip, caption = decide_flip(caption, self.flip_policy, draw_from)
            out[row] = resized_crop(pixels, box, size, as_float=True, flip=flip)
            paired_captions.append(caption)
        out.round_()  # ALBEF crops with PIL, whose output is uint8
        if self.randaugment is not None:
            out = self.randaugment(out, generator)
        return self.normalize(out), paired_captions


def build_transform(kind: str, image_size: int, *, augment: bool = True, flip_policy: str = "skip",
                    crop_scale: tuple[float, float] | None = None, randaugment_ops: int = 2,
                    randaugment_magnitude: float = 7):
    """Return the transform for ``kind``: "pretrain" (crop 0.2-1), "train" (retrieval, crop 0.5-1) or "eval".

    crop_scale overrides the kind's RandomResizedCrop area range; randaugment_ops 0 turns RandAugment off.
    """
    if kind in ("pretrain", "train"):
        scale = tuple(crop_scale) if crop_scale is not None else ((0.2, 1.0) if kind == "pretrain" else (0.5, 1.0))
        return TrainTransform(image_size, augment=augment, crop_scale=scale, flip_policy=flip_policy,
                              randaugment=randaugment_ops > 0, randaugment_ops=max(randaugment_ops, 1),
                              randaugment_magnitude=randaugment_magnitude)
    if kind == "eval":
        return EvalTransform(image_size)
    raise ValueError(f"transform kind {kind!r}: expected 'pretrain', 'train' or 'eval'")
