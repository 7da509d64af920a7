"""ALBEF's RandomAugment on float tensors in [0, 255], rounded and clipped after each op as uint8 would be.

salesforce/ALBEF ``dataset/randaugment.py`` applies, per image, ``N`` ops drawn with replacement from
Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY and
Rotate, each with probability 0.5 at magnitude ``M`` of 10, with OpenCV's affine warps and a grey
fill of 128. Here the same ops run on (B, 3, H, W) tensors, grouped by op over a batch; the PIL
operations are reproduced in torch (tests/test_data_transforms.py compares them with PIL).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

# One generator for a whole batch (None: torch's global one), or one per image.
Generators = torch.Generator | Sequence[torch.Generator] | None

ALBEF_RANDAUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                     "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAX_LEVEL = 10.0
FILL_VALUE = 128.0  # ALBEF's replace_value (128, 128, 128)
ALBEF_REFERENCE_SIZE = 256  # ALBEF's translations are 10 px at level 10 for 256-px images: scaled to our size


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
    """Return float ``image`` ((3, H, W) or (B, 3, H, W)) warped by the 2x3 pixel-space map ``forward`` (source -> output).

    Same convention as OpenCV's ``warpAffine(img, M)``, which ALBEF uses: output pixel p takes
    the source value at M^-1 p, bilinearly; pixels that come from outside the source get ``fill``.
    """
    batched = image.unsqueeze(0) if image.dim() == 3 else image  # (B, 3, H, W)
    height, width = batched.shape[-2:]
    grid = affine_sampling_grid(forward, height, width).expand(batched.shape[0], height, width, 2)
    # Bilinear interpolation is linear: sampling (image - fill) with zeros outside, then adding
    # fill back, equals sampling the image surrounded by a constant border of ``fill`` (cv2's).
    out = F.grid_sample(batched - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + fill
    return out[0] if image.dim() == 3 else out


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast (cutoff 0) per image and channel; images (B, 3, H, W) float."""
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    stretched = (images - low) * (255.0 / span.clamp_min(1.0))
    return torch.where(span > 0, stretched, images)


def _equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per image and channel (ALBEF reproduces it in numpy); images (B, 3, H, W) float."""
    rows = images.shape[0] * 3
    values = images.round().clamp(0, 255).long().view(rows, -1)  # (B*3, H*W)
    offsets = torch.arange(rows).view(rows, 1) * 256
    hist = torch.bincount((values + offsets).flatten(), minlength=rows * 256).view(rows, 256)  # (B*3, 256)
    # step = (pixels - count of the last non-empty bin) // 255, per channel
    last_nonzero = 255 - torch.argmax((hist.flip(1) > 0).long(), dim=1)  # (B*3,)
    last_count = hist.gather(1, last_nonzero.view(rows, 1)).squeeze(1)
    step = (hist.sum(1) - last_count) // 255  # (B*3,)
    safe_step = step.clamp_min(1).view(rows, 1)
    shifted = torch.cat([torch.zeros(rows, 1, dtype=hist.dtype), torch.cumsum(hist, dim=1)[:, :-1]], dim=1)
    lut = ((shifted + safe_step // 2) // safe_step).clamp(0, 255)  # (B*3, 256)
    lut = torch.where(step.view(rows, 1) > 0, lut, torch.arange(256).view(1, 256))  # step 0: identity
    return lut.gather(1, values).view_as(images).float()


def _sharpness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1, /13) on the interior."""
    # The 3x3 box sum as two separable passes of shifted views: far cheaper than a depthwise conv2d on CPU here.
    rows = images[..., :-2, :] + images[..., 1:-1, :] + images[..., 2:, :]  # (..., H-2, W)
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # (..., H-2, W-2)
    centre = images[..., 1:-1, 1:-1]
    smooth = (box + 4.0 * centre) / 13.0
    out = images.clone()
    out[..., 1:-1, 1:-1] = smooth + factor * (centre - smooth)
    return out


class RandomAugment:
    """ALBEF's RandomAugment(N, M, augs=...) on images in [0, 255]: (3, H, W) or a batch (B, 3, H, W); same dtype back.

    For each image, draws ``num_ops`` op names with replacement; each is applied with probability
    ``prob`` at level ``magnitude`` (of 10): enhance factor 0.1 + 1.8 * M/10 (1.36 at M=7); shear
    0.3 * M/10; rotation 30 * M/10 degrees; translation 10 * M/10 pixels at 256 px, scaled to the
    image; signs at random; grey fill 128; values rounded and clipped after each op, as uint8.
    A batch is processed op by op over the images that drew it: the same result as one image at
    a time, at a fraction of the per-call overhead.
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

    def forward_map(self, op: str, sign: float, height: int, width: int):
        """Return the 2x3 pixel map (source -> output) of a geometric op, as ALBEF builds it for cv2.warpAffine."""
        if op == "ShearX":
            return (1.0, sign * self.shear, 0.0), (0.0, 1.0, 0.0)
        if op == "ShearY":
            return (1.0, 0.0, 0.0), (sign * self.shear, 1.0, 0.0)
        if op == "TranslateX":
            return (1.0, 0.0, -sign * self.translate_pixels), (0.0, 1.0, 0.0)
        if op == "TranslateY":
            return (1.0, 0.0, 0.0), (0.0, 1.0, -sign * self.translate_pixels)
        if op == "Rotate":  # counter-clockwise about (W/2, H/2) for positive angles, as cv2.getRotationMatrix2D
            angle = math.radians(sign * self.rotate_degrees)
            cos, sin = math.cos(angle), math.sin(angle)
            cx, cy = width / 2.0, height / 2.0
            return (cos, sin, (1 - cos) * cx - sin * cy), (-sin, cos, sin * cx + (1 - cos) * cy)
        raise ValueError(f"{op} is not a geometric op")

    def apply(self, images: torch.Tensor, op: str, sign: float) -> torch.Tensor:
        """Return float images ((3, H, W) or (B, 3, H, W), values in [0, 255]) after one op; ``sign`` +1 or -1."""
        if op == "Identity":
            return images
        batched = images.unsqueeze(0) if images.dim() == 3 else images
        if op == "AutoContrast":
            out = _autocontrast(batched)
        elif op == "Equalize":
            out = _equalize(batched)
        elif op == "Brightness":
            out = batched * self.enhance_factor
        elif op == "Sharpness":
            out = _sharpness(batched, self.enhance_factor)
        else:
            out = warp_affine(batched, self.forward_map(op, sign, *batched.shape[-2:]))
        out = out.round_().clamp_(0, 255)
        return out[0] if images.dim() == 3 else out

    def draw(self, count: int, generator: Generators = None) -> tuple[list, list, list]:
        """Return (op indices, applied flags, signs), each ``count`` lists of ``num_ops``, for ``count`` images.

        ``generator``: one generator (or None, torch's global one) for all the images, or a sequence
        of one per image, each drawing that image's values exactly as it would for a batch of one.
        """
        if generator is None or isinstance(generator, torch.Generator):
            shape = (count, self.num_ops)
            op_indices = torch.randint(0, len(self.ops), shape, generator=generator).tolist()
            applied = (torch.rand(shape, generator=generator) <= self.prob).tolist()  # ALBEF: skip if > prob
            signs = torch.where(torch.rand(shape, generator=generator) >= 0.5, 1.0, -1.0).tolist()
            return op_indices, applied, signs
        if len(generator) != count:
            raise ValueError(f"{len(generator)} generators for {count} images")
        per_image = [self.draw(1, one) for one in generator]
        return tuple([draws[part][0] for draws in per_image] for part in range(3))

    def __call__(self, images: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """Return the images augmented; ``generator`` as in :meth:`draw` (one per image: batch-independent)."""
        batched = images.unsqueeze(0) if images.dim() == 3 else images  # (B, 3, H, W)
        count, height, width = batched.shape[0], batched.shape[-2], batched.shape[-1]
        op_indices, applied, signs = self.draw(count, generator)
        out = batched.float()
        for slot in range(self.num_ops):  # slot by slot: each image's ops run in the order drawn
            by_op: dict[str, list[int]] = {}
            for row in range(count):
                if applied[row][slot]:
                    by_op.setdefault(self.ops[op_indices[row][slot]], []).append(row)
            # All geometric ops of the slot in one grid_sample call, each image with its own (cached) grid.
            warped = [(row, op) for op in GEOMETRIC_OPS for row in by_op.get(op, [])]
            if warped:
                rows = torch.tensor([row for row, _ in warped])
                grid = torch.cat([affine_sampling_grid(self.forward_map(op, signs[row][slot], height, width),
                                                      height, width) for row, op in warped])  # (n, H, W, 2)
                sampled = F.grid_sample(out[rows] - FILL_VALUE, grid, mode="bilinear", padding_mode="zeros",
                                        align_corners=True) + FILL_VALUE
                out[rows] = sampled.round_().clamp_(0, 255)
            for op in ("AutoContrast", "Equalize", "Brightness", "Sharpness"):
                if by_op.get(op):
                    rows = torch.tensor(by_op[op])
                    out[rows] = self.apply(out[rows], op, 1.0)
        if images.dim() == 3:
            out = out[0]
        return out.to(torch.uint8) if images.dtype == torch.uint8 else out
