"""Image transforms of METHOD.md on uint8 tensors, with the horizontal flip kept consistent with the caption.

Training (ALBEF's ``pretrain_transform`` / ``train_transform``, salesforce/ALBEF ``dataset/__init__.py``):
RandomResizedCrop (scale 0.2-1 in pretraining, 0.5-1 in retrieval fine-tuning, bicubic),
horizontal flip, ALBEF's RandomAugment (2 ops drawn from Identity, AutoContrast, Equalize,
Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Rotate; each applied with
probability 0.5 at magnitude 7 of 10; grey fill 128), then CLIP's normalisation constants.
Evaluation: bicubic resize to a square, normalise.

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

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ALBEF_RANDAUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                     "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAX_LEVEL = 10.0
FILL_VALUE = 128.0  # ALBEF's replace_value (128, 128, 128)
ALBEF_REFERENCE_SIZE = 256  # ALBEF's translations are 10 px at level 10 for 256-px images: scaled to our size

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


def to_uint8_tensor(image) -> torch.Tensor:
    """Return a (3, H, W) uint8 tensor from a PIL image or a uint8 tensor (grey and RGBA made RGB)."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
        return image
    import numpy as np

    rgb = image.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


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
# ALBEF's RandomAugment, on float tensors in [0, 255] (rounded and clipped after each op as uint8 would be)

@functools.lru_cache(maxsize=256)
def affine_sampling_grid(forward: tuple[tuple[float, float, float], tuple[float, float, float]],
                         height: int, width: int) -> torch.Tensor:
    """Return the (1, H, W, 2) grid_sample grid of the pixel-space map ``forward`` (source -> output); cached.

    RandomAugment at a fixed magnitude only ever uses ten maps (five ops, two signs) per size.
    """
    (a, b, c), (d, e, f) = forward
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det  # inverse linear part
    ic, if_ = -(ia * c + ib * f), -(id_ * c + ie * f)  # inverse offset
    # Pixel coordinates x = (u + 1) (W - 1) / 2 for normalised u (align_corners=True); express the
    # inverse map in normalised coordinates for affine_grid.
    sx, sy = (width - 1) / 2.0, (height - 1) / 2.0
    theta = torch.tensor([[[ia, ib * sy / sx, (ia * sx + ib * sy + ic - sx) / sx],
                           [id_ * sx / sy, ie, (id_ * sx + ie * sy + if_ - sy) / sy]]], dtype=torch.float32)
    return F.affine_grid(theta, [1, 3, height, width], align_corners=True)  # (1, H, W, 2)


def warp_affine(image: torch.Tensor, forward: tuple[tuple[float, float, float], tuple[float, float, float]],
                fill: float = FILL_VALUE) -> torch.Tensor:
    """Return ``image`` (3, H, W) float warped by the 2x3 pixel-space map ``forward`` (source -> output), bilinear, filled.

    Same convention as OpenCV's ``warpAffine(img, M)``, which ALBEF uses: output pixel p takes
    the source value at M^-1 p; pixels that come from outside the source get ``fill``.
    """
    _, height, width = image.shape
    grid = affine_sampling_grid(forward, height, width)
    # Bilinear interpolation is linear: sampling (image - fill) with zeros outside, then adding
    # fill back, equals sampling the image surrounded by a constant border of ``fill`` (cv2's).
    shifted = (image - fill).unsqueeze(0)
    return F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0] + fill


def _autocontrast(image: torch.Tensor) -> torch.Tensor:
    low = image.amin(dim=(1, 2), keepdim=True)
    high = image.amax(dim=(1, 2), keepdim=True)
    span = high - low
    stretched = (image - low) * (255.0 / span.clamp_min(1.0))
    return torch.where(span > 0, stretched, image)


def _equalize(image: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel (ALBEF reproduces it in numpy), vectorised over channels."""
    values = image.round().clamp(0, 255).long().view(3, -1)  # (3, H*W)
    offsets = torch.arange(3).view(3, 1) * 256
    hist = torch.bincount((values + offsets).flatten(), minlength=768).view(3, 256)  # (3, 256)
    # step = (pixels - count of the last non-empty bin) // 255, per channel
    last_nonzero = 255 - torch.argmax((hist.flip(1) > 0).long(), dim=1)  # (3,)
    last_count = hist.gather(1, last_nonzero.view(3, 1)).squeeze(1)
    step = (hist.sum(1) - last_count) // 255  # (3,)
    safe_step = step.clamp_min(1).view(3, 1)
    shifted = torch.cat([torch.zeros(3, 1, dtype=hist.dtype), torch.cumsum(hist, dim=1)[:, :-1]], dim=1)
    lut = ((shifted + safe_step // 2) // safe_step).clamp(0, 255)  # (3, 256)
    lut = torch.where(step.view(3, 1) > 0, lut, torch.arange(256).view(1, 256))  # step 0: identity
    return lut.gather(1, values).view_as(image).float()


def _sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1, /13) on the interior."""
    height, width = image.shape[-2:]
    # Nine shifted views summed: much faster than a depthwise conv2d on CPU at these sizes.
    neighbours = sum(image[:, dy:dy + height - 2, dx:dx + width - 2] for dy in range(3) for dx in range(3))
    centre = image[:, 1:-1, 1:-1]
    smooth = (neighbours + 4.0 * centre) / 13.0
    out = image.clone()
    out[:, 1:-1, 1:-1] = smooth + factor * (centre - smooth)
    return out


class RandomAugment:
    """ALBEF's RandomAugment(N, M, augs=...) on a (3, H, W) image, uint8 or float in [0, 255]; returns the same dtype.

    Draws ``num_ops`` op names with replacement; each is applied with probability ``prob`` at
    level ``magnitude`` (of 10): enhance factor 0.1 + 1.8 * M/10 (1.36 at M=7); shear 0.3 * M/10;
    rotation 30 * M/10 degrees; translation 10 * M/10 pixels at 256 px, scaled to the image;
    signs at random; grey fill 128.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 7, prob: float = 0.5,
                 ops: Sequence[str] = ALBEF_RANDAUG_OPS, image_size: int = ALBEF_REFERENCE_SIZE):
        unknown = [op for op in ops if op not in ALBEF_RANDAUG_OPS]
        if unknown:
            raise ValueError(f"unknown RandomAugment ops {unknown}; known: {ALBEF_RANDAUG_OPS}")
        if not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"magnitude={magnitude}: expected 0..{MAX_LEVEL:g}")
        self.num_ops, self.magnitude, self.prob, self.ops = num_ops, float(magnitude), prob, tuple(ops)
        level = self.magnitude / MAX_LEVEL
        self.enhance_factor = level * 1.8 + 0.1
        self.shear = level * 0.3
        self.rotate_degrees = level * 30.0
        self.translate_pixels = level * 10.0 * image_size / ALBEF_REFERENCE_SIZE

    def __repr__(self) -> str:
        return f"RandomAugment(num_ops={self.num_ops}, magnitude={self.magnitude:g}, prob={self.prob}, ops={self.ops})"

    def apply(self, image: torch.Tensor, op: str, sign: float) -> torch.Tensor:
        """Return float image (3, H, W) in [0, 255] after one op; ``sign`` is +1 or -1 for the signed ops."""
        _, height, width = image.shape
        if op == "Identity":
            return image
        if op == "AutoContrast":
            out = _autocontrast(image)
        elif op == "Equalize":
            out = _equalize(image)
        elif op == "Brightness":
            out = image * self.enhance_factor
        elif op == "Sharpness":
            out = _sharpness(image, self.enhance_factor)
        else:
            if op == "ShearX":
                forward = ((1.0, sign * self.shear, 0.0), (0.0, 1.0, 0.0))
            elif op == "ShearY":
                forward = ((1.0, 0.0, 0.0), (sign * self.shear, 1.0, 0.0))
            elif op == "TranslateX":
                forward = ((1.0, 0.0, -sign * self.translate_pixels), (0.0, 1.0, 0.0))
            elif op == "TranslateY":
                forward = ((1.0, 0.0, 0.0), (0.0, 1.0, -sign * self.translate_pixels))
            else:  # Rotate: counter-clockwise about the centre for positive angles, as cv2.getRotationMatrix2D
                angle = math.radians(sign * self.rotate_degrees)
                cos, sin = math.cos(angle), math.sin(angle)
                cx, cy = width / 2.0, height / 2.0
                forward = ((cos, sin, (1 - cos) * cx - sin * cy), (-sin, cos, sin * cx + (1 - cos) * cy))
            out = warp_affine(image, forward)
        return out.round_().clamp_(0, 255)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        op_indices = torch.randint(0, len(self.ops), (self.num_ops,), generator=generator).tolist()
        coins = torch.rand(self.num_ops, generator=generator).tolist()
        signs = torch.rand(self.num_ops, generator=generator).tolist()
        out = image.float()
        for op_index, coin, sign in zip(op_indices, coins, signs):
            if coin > self.prob:  # ALBEF: `if np.random.random() > prob: continue`
                continue
            out = self.apply(out, self.ops[op_index], 1.0 if sign >= 0.5 else -1.0)
        return out.to(torch.uint8) if image.dtype == torch.uint8 else out


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


class TrainTransform:
    """Training transform of METHOD.md: crop, caption-aware flip, RandomAugment, normalise; returns (float (3, S, S), caption).

    ``augment=False`` gives the evaluation transform (resize + normalise, no randomness).
    ``crop_scale`` is (0.2, 1.0) for pretraining and (0.5, 1.0) for retrieval fine-tuning, as ALBEF.
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
        pixels = to_uint8_tensor(image)
        if not self.augment:
            return self.normalize(resize_square(pixels, self.image_size)), caption
        box = random_resized_crop_box(pixels.shape[1], pixels.shape[2], self.crop_scale, self.crop_ratio, generator)
        flip, caption = decide_flip(caption, self.flip_policy, generator)
        pixels = resized_crop(pixels, box, self.image_size, as_float=True, flip=flip)  # float in [0, 255] from here on
        if self.randaugment is not None:
            pixels = self.randaugment(pixels, generator)
        return self.normalize(pixels), caption


def build_transform(kind: str, image_size: int, *, augment: bool = True, flip_policy: str = "skip"):
    """Return the transform for ``kind``: "pretrain" (crop 0.2-1), "train" (retrieval, crop 0.5-1) or "eval"."""
    if kind == "pretrain":
        return TrainTransform(image_size, augment=augment, crop_scale=(0.2, 1.0), flip_policy=flip_policy)
    if kind == "train":
        return TrainTransform(image_size, augment=augment, crop_scale=(0.5, 1.0), flip_policy=flip_policy)
    if kind == "eval":
        return EvalTransform(image_size)
    raise ValueError(f"transform kind {kind!r}: expected 'pretrain', 'train' or 'eval'")
