"""Rendering of the emoji corpus: Twemoji PNGs and OpenMoji font glyphs on white, one size, PNG bytes.

The ``_init_renderer`` / ``_render_job`` pair runs in worker processes started with "spawn",
so this module imports only the standard library at import time (Pillow inside the functions).
"""
from __future__ import annotations

import hashlib
import io
import os

RENDER_RECIPE = 1  # bump when rendering changes: images of an older recipe are re-rendered, not reused

_RENDER_STATE: dict = {}
_CALIBRATION_CHAR = "\U0001F7E5"  # large red square: drawn from 11 to 61 on OpenMoji's 72-unit grid, both ways


def _init_renderer(image_size: int, font_path: str) -> None:
    """Load OpenMoji's font at the size that draws its 72-unit square on the render canvas; returns nothing.

    Runs once per process (the pool's initializer): the calibrated font and the vertical offset
    are kept in ``_RENDER_STATE`` for ``render_openmoji``.
    """
    from PIL import Image, ImageDraw, ImageFont

    render_size = max(4 * image_size, 144)  # draw large, then downsample: antialiased edges
    font_size = render_size * 72.0 / 92.8125  # OpenMoji's advance is 1.289 em: this makes it render_size px
    font = ImageFont.truetype(font_path, font_size)
    scale = render_size / font.getlength(_CALIBRATION_CHAR)
    if abs(scale - 1.0) > 0.01:
        font = ImageFont.truetype(font_path, font_size * scale)
    # The font's 72-unit design square spans the advance horizontally; find where it sits
    # vertically by drawing the red square, whose margins are equal on all sides.
    probe = Image.new("RGBA", (render_size, render_size), (0, 0, 0, 0))
    ImageDraw.Draw(probe).text((0, 0), _CALIBRATION_CHAR, font=font, embedded_color=True, anchor="la")
    left, top, right, bottom = probe.getbbox()
    y_offset = ((left - top) + (right - bottom)) / 2.0  # shift that makes top/bottom margins equal left/right
    _RENDER_STATE.update(image_size=image_size, render_size=render_size, font=font, y_offset=y_offset)


def _png_bytes(image) -> bytes:
    """Return ``image`` encoded as PNG without optimisation (the same bytes on every run)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def render_twemoji(png_path: str, image_size: int):
    """Return the Twemoji PNG composited on white and resized to image_size (RGB PIL image)."""
    from PIL import Image

    with Image.open(png_path) as source:
        rgba = source.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB").resize((image_size, image_size), Image.LANCZOS)


def render_openmoji(char: str):
    """Return the OpenMoji glyph of ``char`` drawn on white at the initialised size (RGB PIL image)."""
    from PIL import Image, ImageDraw

    state = _RENDER_STATE
    size = state["render_size"]
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(canvas).text((0, state["y_offset"]), char, font=state["font"], embedded_color=True,
                                anchor="la", fill=(0, 0, 0))
    return canvas.resize((state["image_size"], state["image_size"]), Image.LANCZOS)


def _render_job(job: tuple[str, str, str, str]) -> tuple[str, str]:
    """Render one image, write it to its output path; return (that path, sha256 of the file)."""
    style, char, source, out_path = job
    if style == "twemoji":
        image = render_twemoji(source, _RENDER_STATE["image_size"])
    else:
        image = render_openmoji(char)
    if image.convert("L").getextrema() == (255, 255):
        raise RuntimeError(f"rendering {style} {char!r} ({source}) produced a blank image")
    data = _png_bytes(image)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, out_path)
    return out_path, hashlib.sha256(data).hexdigest()



def render_images(jobs: list[tuple[str, str, str, str]], image_size: int, font_path: str,
                  workers: int) -> list[tuple[str, str]]:
    """Render every ``(style, char, source, out_path)`` job; return [(out_path, sha256 of the file)] in job order.

    Small batches (or ``workers == 1``) render in this process; larger ones in a pool of
    ``workers`` processes, each initialised once with the calibrated font.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    init_args = (image_size, font_path)
    if workers == 1 or len(jobs) < 64:
        _init_renderer(*init_args)
        return [_render_job(job) for job in jobs]
    # "spawn": the caller may be a training process with torch's thread pools running, which a
    # fork would copy in an undefined state; the workers import only Pillow and this module.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_renderer, initargs=init_args,
                             mp_context=context) as pool:
        return list(pool.map(_render_job, jobs, chunksize=64))
