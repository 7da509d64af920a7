"""Fixed re-drawings of a training image in another style, the emoji kept: the "training variety" of pretraining.

    >>> styled = apply_style("outline", image)      # a PIL RGB image of an emoji drawn on white
    >>> STYLE_VARIANTS
    ('grayscale', 'hue', 'outline', 'flat', 'background')

Each style is a pure function of the image: whatever it draws at random (the hue angle, the background
colour) is seeded by the image's own bytes, never by a global generator. So a training image's variant is
the same tensor at every epoch, and the frozen ImageNet trunk's cache of feature maps
(`codis_lib.model.efficientnet`, keyed by the bytes of each image) computes its map once, as for the
original; random augmentation at every step would make it compute every map at every step.

| style | what it draws |
| --- | --- |
| ``grayscale`` | the luminance, stretched to the full 0-255 range |
| ``hue`` | every colour's hue turned by 90-270 degrees (the angle from the image's bytes); greys kept |
| ``outline`` | a colouring-book page: dark strokes where colours meet, white elsewhere |
| ``flat`` | colours posterized to 4 levels a channel, then a slight blur (thin strokes soften) |
| ``background`` | the white around the drawing (near-white pixels joined to the border) in a pastel colour |

The two styles that change colours (``COLOUR_CHANGING``) would change what a caption like "red heart"
or "green book" says: `names_colour` finds such captions, and `codis_lib.data.datasets.PretrainDataset`
gives those records no variant in these styles. Skin tones are not colour names here: both styles keep
the light-to-dark order that tells "light skin tone" from "dark skin tone".
"""
from __future__ import annotations

import colorsys
import hashlib
import re
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

__all__ = ["STYLE_VARIANTS", "COLOUR_CHANGING", "apply_style", "style_tensor", "check_style_names", "names_colour",
           "style_seed", "background_mask", "background_colour", "hue_angle", "colour_steps", "VariantItems",
           "style_variant_grid"]

NEAR_WHITE = 245  # a pixel whose three channels are all at least this is background, if joined to the border
EDGE_THRESHOLD = 24  # colour step (max over channels and 4-neighbours) below which `outline` draws nothing
COLOUR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "violet", "brown", "black", "white",
                "pink", "grey", "gray", "gold", "golden", "silver")
_COLOUR_PATTERN = re.compile(r"\b(" + "|".join(COLOUR_WORDS) + r")\b", re.IGNORECASE)


def style_seed(image: Image.Image, style: str) -> int:
    """Return a 64-bit number from the image's size and pixel bytes and the style's name (its own stream)."""
    digest = hashlib.blake2b(np.asarray(image).tobytes(), digest_size=8, person=style.encode()[:16])
    digest.update(repr(image.size).encode())
    return int.from_bytes(digest.digest(), "little")


def hue_angle(image: Image.Image) -> int:
    """Return the degrees (90-270) `hue` turns this image's colours by."""
    return 90 + style_seed(image, "hue") % 181


def background_colour(image: Image.Image) -> tuple[int, int, int]:
    """Return the pastel (R, G, B) `background` paints this image's background with: never near-white."""
    seed = style_seed(image, "background")
    hue = (seed % 360) / 360
    saturation = 0.25 + ((seed >> 16) % 21) / 100  # 0.25-0.45
    value = 0.90 + ((seed >> 32) % 9) / 100  # 0.90-0.98
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def background_mask(image: Image.Image) -> np.ndarray:
    """Return the (H, W) bool mask of the background: near-white pixels joined to the border through near-white.

    White inside the drawing (the whites of the eyes, a white cane) is cut off from the border by the
    drawing's edge, so it is not background.
    """
    near_white = (np.asarray(image) >= NEAR_WHITE).all(axis=-1)
    reached = np.zeros_like(near_white)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        reached[edge] = near_white[edge]
    while True:  # grow by one pixel (4-neighbours) at a time, inside the near-white pixels
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= near_white
        if (grown == reached).all():
            return reached
        reached = grown


def colour_steps(pixels: np.ndarray) -> np.ndarray:
    """Return (H, W): each pixel's largest channel difference to itself and its 4-neighbours (0-255)."""
    values = pixels.astype(np.int16)
    step = np.zeros(values.shape[:2], dtype=np.int16)
    for axis in (0, 1):
        diff = np.abs(np.diff(values, axis=axis)).max(axis=-1)  # between each pixel and the next along `axis`
        if axis == 0:
            step[1:] = np.maximum(step[1:], diff)
            step[:-1] = np.maximum(step[:-1], diff)
        else:
            step[:, 1:] = np.maximum(step[:, 1:], diff)
            step[:, :-1] = np.maximum(step[:, :-1], diff)
    return step


def _grayscale(image: Image.Image) -> Image.Image:
    luminance = np.asarray(image.convert("L")).astype(np.int32)  # ITU-R 601: (299 R + 587 G + 114 B) / 1000
    low, high = int(luminance.min()), int(luminance.max())
    if high > low:  # darkest -> 0, lightest -> 255, exactly (Pillow's autocontrast turns 255 into 254)
        luminance = ((luminance - low) * 255 * 2 + (high - low)) // (2 * (high - low))  # rounded
    return Image.fromarray(luminance.astype(np.uint8), "L").convert("RGB")


def _hue(image: Image.Image) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    shift = round(hue_angle(image) * 256 / 360)
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _outline(image: Image.Image) -> Image.Image:
    step = colour_steps(np.asarray(image))
    ink = np.where(step >= EDGE_THRESHOLD, np.clip(step * 2, 0, 255), 0)  # a strong step: a black stroke
    return Image.fromarray((255 - ink).astype(np.uint8), "L").convert("RGB")


def _flat(image: Image.Image) -> Image.Image:
    levels = (np.round(np.asarray(image) / 85.0) * 85).astype(np.uint8)  # 0, 85, 170, 255: white stays white
    return Image.fromarray(levels, "RGB").filter(ImageFilter.GaussianBlur(radius=0.7))


def _background(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image).copy()
    pixels[background_mask(image)] = background_colour(image)
    return Image.fromarray(pixels, "RGB")


_STYLES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "grayscale": _grayscale, "hue": _hue, "outline": _outline, "flat": _flat, "background": _background}
STYLE_VARIANTS: tuple[str, ...] = tuple(_STYLES)
COLOUR_CHANGING: frozenset[str] = frozenset({"grayscale", "hue"})


def apply_style(name: str, image: Image.Image) -> Image.Image:
    """Return ``image`` (PIL, RGB) re-drawn in style ``name``: same size, RGB; ValueError for an unknown name."""
    if name not in _STYLES:
        raise ValueError(f"unknown style variant {name!r}; valid: {', '.join(STYLE_VARIANTS)}")
    if image.mode != "RGB":
        raise ValueError(f"apply_style({name!r}): expected an RGB image, got mode {image.mode}")
    return _STYLES[name](image)


def style_tensor(name: str, image: torch.Tensor) -> torch.Tensor:
    """Return a (3, H, W) uint8 tensor re-drawn in style ``name`` (`apply_style` on its PIL image)."""
    pixels = image.permute(1, 2, 0).contiguous().numpy()
    styled = np.asarray(apply_style(name, Image.fromarray(pixels, "RGB")))
    return torch.from_numpy(styled.copy()).permute(2, 0, 1).contiguous()


def check_style_names(names: Sequence[str], key: str = "style_variants") -> None:
    """Raise ValueError (one line naming ``key``) for an unknown or repeated style name."""
    for index, name in enumerate(names):
        if name not in _STYLES:
            raise ValueError(f"{key}: unknown style variant {name!r}; valid: {', '.join(STYLE_VARIANTS)}")
        if name in names[:index]:
            raise ValueError(f"{key}: {name!r} is listed twice")


def names_colour(captions: Sequence[str]) -> bool:
    """Return True if a caption names a colour ("red heart", "white cane"): a colour change would contradict it."""
    return any(_COLOUR_PATTERN.search(caption) for caption in captions)


class VariantItems:
    """Which record, and in which style, each item of a dataset with style variants shows; the styled images.

    Items 0 .. n-1 are the records in their own drawing; then, style by style in the order given, every
    record the style may re-draw (`allows`: a style in COLOUR_CHANGING skips the records whose captions
    name a colour). With `draw_all` (the dataset keeps its decoded images in memory) every styled image
    is drawn once and kept; otherwise `styled` draws it again at each load.
    """

    def __init__(self, styles: Sequence[str], captions: Sequence[Sequence[str]]):
        check_style_names(list(styles))
        self.styles = tuple(styles)
        self.colour_named = frozenset(r for r, texts in enumerate(captions) if names_colour(texts))
        self.record: list[int] = list(range(len(captions)))
        self.style: list[str | None] = [None] * len(captions)
        for name in self.styles:
            takers = [r for r in range(len(captions)) if self.allows(name, r)]
            self.record += takers
            self.style += [name] * len(takers)
        self._drawn: dict[tuple[str, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.record)

    def allows(self, style: str | None, record: int) -> bool:
        """Return True if record ``record`` may be shown in ``style`` (None: its own drawing, always)."""
        return style not in COLOUR_CHANGING or record not in self.colour_named

    def draw_all(self, paths: Sequence[str], load: Callable[[str], torch.Tensor], max_bytes: int) -> int:
        """Draw and keep the styled image of every item (``paths[record]`` read by ``load``); return the bytes kept."""
        total = 0
        for record, style in zip(self.record, self.style):
            key = (paths[record], style)
            if style is None or key in self._drawn:
                continue
            self._drawn[key] = style_tensor(style, load(paths[record]))
            total += self._drawn[key].numel()
            if total > max_bytes:
                raise MemoryError(f"style variants: the styled images would exceed the image cache's limit "
                                  f"({max_bytes} bytes left) after {len(self._drawn)} images; use fewer "
                                  f"data.style_variants or data.cache_images: false")
        return total

    def styled(self, image: torch.Tensor, path: str, style: str | None) -> torch.Tensor:
        """Return ``image`` (the decoded file ``path``) in ``style``: kept by `draw_all`, else drawn now."""
        if style is None:
            return image
        drawn = self._drawn.get((path, style))
        return drawn if drawn is not None else style_tensor(style, image)


def style_variant_grid(images: Sequence[Image.Image], names: Sequence[str] = STYLE_VARIANTS) -> Image.Image:
    """Return one row per image: the original, then each style in ``names`` (a figure for the docs)."""
    width, height = images[0].size
    grid = Image.new("RGB", (width * (1 + len(names)), height * len(images)), "white")
    for row, image in enumerate(images):
        for column, styled in enumerate([image] + [apply_style(name, image) for name in names]):
            grid.paste(styled, (column * width, row * height))
    return grid
