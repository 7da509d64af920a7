"""Exact conversion of a decoded PIL image of any mode to 8-bit RGB, transparency composited on a background.

``Image.convert("RGB")`` is not safe for every mode a file can hold: a 16-bit grey PNG (mode ``I;16``,
``I;16B`` or ``I``) is clipped to 255, so it comes out solid white, and transparency is dropped, so
a transparent pixel shows whatever colour it stores (black for most RGBA art) instead of the
corpus background. :func:`pil_to_rgb_array` handles each mode by hand:

| mode | 8-bit RGB value |
| --- | --- |
| ``1`` | 0 or 255 on all three channels |
| ``L`` | the grey value on all three channels |
| ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` | round(v * 255 / 65535), grey |
| ``I`` (32-bit) | clipped to [0, 65535], then as ``I;16`` (Pillow's mode for 16-bit PNG grey) |
| ``F`` (float) | rounded and clipped to [0, 255] (PIL's own scale for ``F``, as ``convert("L")``) |
| ``RGB``, ``RGBX`` | as stored |
| ``CMYK`` | round((255 - C) (255 - K) / 255) etc. (the naive conversion, as Pillow's) |
| ``YCbCr`` | JFIF full-range BT.601: R = Y + 1.402 (Cr - 128), G = Y - 0.344136 (Cb - 128) - 0.714136 (Cr - 128), B = Y + 1.772 (Cb - 128), rounded and clipped |
| ``HSV`` | Pillow's HSV -> RGB |
| ``P``, ``PA`` | the palette colour (and the palette's alpha or ``tRNS`` entry) |
| ``LA``, ``La``, ``RGBA``, ``RGBa`` | the colour (premultiplied modes un-premultiplied by Pillow) with its alpha |

Alpha, and a ``transparency`` colour key (PNG ``tRNS`` of an ``L``, ``I;16`` or ``RGB`` image), is
composited on ``background`` (white by default, the emoji corpus's background) with exact integer
rounding: ``out = (c * a + bg * (255 - a) + 127) // 255``. Other modes (``LAB``, raw packings)
raise a one-line ValueError naming the mode.

Every image file the package reads (training, evaluation, `codis-check-data`) is opened by
:func:`open_image`, which turns Pillow's decompression-bomb refusal (an image of more than twice
``PIL.Image.MAX_IMAGE_PIXELS`` pixels, e.g. a 48 KB PNG of 20000 x 20000) into :class:`ImageTooLargeError`, a
one-line ValueError naming the file: the readers then drop the record or refuse it like any other
undecodable image (``on_error``), instead of a traceback.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

__all__ = ["WHITE", "SUPPORTED_MODES", "ImageTooLargeError", "open_image", "pil_to_rgb_array", "composite_on"]

WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_CONVERTED_BY_PIL = {"P": "RGBA", "PA": "RGBA", "La": "LA", "RGBa": "RGBA", "HSV": "RGB"}
# Every mode pil_to_rgb_array converts (the table above); `codis-check-data` reports any other as wrong_mode.
SUPPORTED_MODES = frozenset(("1", "L", "LA", "RGB", "RGBX", "RGBA", "CMYK", "YCbCr", "F") + _SIXTEEN_BIT_MODES
                            + tuple(_CONVERTED_BY_PIL))


class ImageTooLargeError(ValueError):
    """An image file over Pillow's decompression-bomb limit: refused before its pixels are decoded."""


@contextmanager
def open_image(path) -> Iterator:
    """``PIL.Image.open(path)`` as a context, with the decompression-bomb limit as a one-line ImageTooLargeError."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            yield image
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"image too large to decode safely (a decompression bomb?): {path} "
                                 f"({' '.join(str(error).split())})") from None


def composite_on(colour: np.ndarray, alpha: np.ndarray, background: Sequence[int] = WHITE) -> np.ndarray:
    """Return (H, W, 3) uint8: ``colour`` (H, W, 3) over ``background`` with ``alpha`` (H, W) in 0..255, rounded."""
    a = alpha.astype(np.int32)[..., None]
    bg = np.asarray(background, dtype=np.int32).reshape(1, 1, 3)
    return ((colour.astype(np.int32) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Return 16-bit values (any int dtype, clipped to [0, 65535]) as 8-bit: round(v * 255 / 65535) = round(v / 257)."""
    v = np.clip(values.astype(np.int64), 0, 65535)
    return ((2 * v + 257) // 514).astype(np.uint8)  # v / 257 is never exactly x.5 (257 is odd)


def _ycbcr_to_rgb(raw: np.ndarray) -> np.ndarray:
    """Return the JFIF (full-range BT.601) RGB of a (H, W, 3) YCbCr array, rounded and clipped to uint8."""
    y, cb, cr = (raw[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], axis=-1)
    return np.clip(np.floor(rgb + 0.5), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _colour_and_alpha(mode: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ((H, W, 3) uint8 colour, (H, W) uint8 alpha or None) of a raw PIL array of ``mode``."""
    if mode == "1":
        return _grey_to_rgb(raw.astype(np.uint8) * 255), None
    if mode == "L":
        return _grey_to_rgb(raw), None
    if mode == "LA":
        return _grey_to_rgb(raw[..., 0]), raw[..., 1]
    if mode in _SIXTEEN_BIT_MODES:
        return _grey_to_rgb(_sixteen_to_eight(raw)), None
    if mode == "F":
        return _grey_to_rgb(np.clip(np.floor(raw.astype(np.float64) + 0.5), 0, 255).astype(np.uint8)), None
    if mode in ("RGB", "RGBX"):
        return np.ascontiguousarray(raw[..., :3]), None
    if mode == "RGBA":
        return np.ascontiguousarray(raw[..., :3]), raw[..., 3]
    if mode == "CMYK":
        c = raw.astype(np.int32)
        white = 255 - c[..., 3:4]
        return (((255 - c[..., :3]) * white + 127) // 255).astype(np.uint8), None
    if mode == "YCbCr":
        return _ycbcr_to_rgb(raw), None
    raise ValueError(f"image mode {mode!r} has no defined conversion to RGB here (supported: "
                     f"{', '.join(sorted(SUPPORTED_MODES))})")


def _colour_key_alpha(mode: str, raw: np.ndarray, key) -> np.ndarray | None:
    """Return the alpha (H, W) of a ``transparency`` colour key (0 where the stored value equals it), or None."""
    if key is None or mode not in ("1", "L", "RGB") + _SIXTEEN_BIT_MODES:
        return None
    if mode == "RGB":
        if not (isinstance(key, tuple) and len(key) == 3):
            return None
        hit = np.all(raw == np.asarray(key, dtype=raw.dtype).reshape(1, 1, 3), axis=-1)
    else:
        if not isinstance(key, int):
            return None
        stored = raw.astype(np.int64) * (255 if mode == "1" else 1)
        hit = stored == (255 if mode == "1" and key else key)
    return np.where(hit, 0, 255).astype(np.uint8)


def pil_to_rgb_array(image, background: Sequence[int] = WHITE) -> np.ndarray:
    """Return the (H, W, 3) uint8 RGB array of a loaded PIL image of any supported mode (table in the module doc).

    Transparency (an alpha channel, a palette alpha, or a ``transparency`` colour key) is composited on
    ``background``, an (R, G, B) triple of 0..255 (default white).
    """
    if len(background) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in background):
        raise ValueError(f"background must be three integers in 0..255 (R, G, B), got {tuple(background)!r}")
    mode = image.mode
    if mode in _CONVERTED_BY_PIL:  # palette lookups, premultiplied alpha, HSV: Pillow's conversion is exact
        image = image.convert(_CONVERTED_BY_PIL[mode])
        mode = image.mode
    raw = np.asarray(image)
    colour, alpha = _colour_and_alpha(mode, raw)
    if alpha is None:
        alpha = _colour_key_alpha(mode, raw, image.info.get("transparency"))
    return colour if alpha is None else composite_on(colour, alpha, background)
