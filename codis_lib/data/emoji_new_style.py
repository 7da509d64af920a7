"""The held-out art style: the evaluation emoji drawn by Noto Color Emoji, a family no training image comes from.

The emoji corpus trains on two art families (Twemoji, OpenMoji). ``new_drawings`` asks for the
*other* of those two drawings of a training emoji, so a model can pass it by knowing the two styles.
This module adds two splits that no style seen in training can explain:

- ``new_style``: the ``new_drawings`` emoji (concepts known, captions known) drawn by Noto Color Emoji;
- ``new_style_test``: the ``test`` emoji (concepts never seen in training) drawn by Noto Color Emoji.

Noto Color Emoji (Google, SIL Open Font License 1.1) is Debian's ``fonts-noto-color-emoji``; it is an
optional extra of the corpus (``apt-get install fonts-noto-color-emoji``, or point ``CODIS_NOTO_FONT``
at the ``NotoColorEmoji.ttf`` file). Without the font the splits are skipped with one line. No Noto
art, colour or monochrome, is ever used for training: the builder writes only evaluation files.

Each glyph is drawn from the font's only bitmap strike (109 px) on white and scaled to the corpus's
image size. An emoji the font does not draw (newer than the font, or a sequence it does not join)
is left out of both splits and listed in ``new_style_manifest.json`` with the reason.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from codis_lib.data.emoji_manifest import sha256_file, write_json

__all__ = ["NEW_STYLE_SPLITS", "NOTO_STYLE", "NOTO_LICENCE", "noto_font_path", "build_new_style",
           "ensure_new_style", "NEW_STYLE_MANIFEST"]

logger = logging.getLogger(__name__)

NOTO_STYLE = "noto"
NEW_STYLE_SPLITS = {"new_style": "new_drawings", "new_style_test": "test"}  # split -> the split whose emoji it draws
NEW_STYLE_MANIFEST = "new_style_manifest.json"
NEW_STYLE_RECIPE = 1  # bump when the rendering changes
NOTO_LICENCE = "Noto Color Emoji by Google, SIL Open Font License 1.1 (Debian: fonts-noto-color-emoji)"
_STRIKE = 109  # the font's only bitmap size
_MARGIN = 0.03  # white margin on each side, a fraction of the drawing's longer side (Twemoji's is about 3 %)
_FONT_PLACES = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/fonts/noto/NotoColorEmoji.ttf",
                "/usr/local/share/fonts/NotoColorEmoji.ttf")


def noto_font_path() -> Path | None:
    """Return the Noto Color Emoji font file: ``CODIS_NOTO_FONT`` if set (it must exist), else a system place."""
    named = os.environ.get("CODIS_NOTO_FONT")
    if named:
        if not Path(named).is_file():
            raise FileNotFoundError(f"CODIS_NOTO_FONT={named}: no such file (the NotoColorEmoji.ttf font)")
        return Path(named)
    return next((Path(p) for p in _FONT_PLACES if Path(p).is_file()), None)


class _NotoRenderer:
    """Draws one emoji with the Noto font on white at ``image_size``; None where the font cannot draw it."""

    def __init__(self, font_path: Path, image_size: int):
        from PIL import ImageFont

        self.font = ImageFont.truetype(str(font_path), _STRIKE)
        self.image_size = image_size

    def _canvas(self, text: str):
        from PIL import Image, ImageDraw

        width = int(round(self.font.getlength(text)))
        canvas = Image.new("RGBA", (max(width, 1), 128), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), text, font=self.font, embedded_color=True)
        return canvas

    def render(self, char: str):
        """Return (RGB image, None) or (None, why the font does not draw ``char``)."""
        from PIL import Image

        glyph = self._canvas(char)
        box = glyph.getchannel("A").getbbox()
        if box is None or box[3] - box[1] < 8:
            return None, "not in the font"
        if glyph.width > 140:
            return None, "drawn as several glyphs (sequence not joined by the font)"
        base = char.replace("\ufe0f", "")
        if len(base) > 1 and self._canvas(base[0]).tobytes() == glyph.tobytes():
            return None, "drawn as its first code point only"
        # Cropped to the drawing and centred with a thin margin, as the training art sets fill their frame.
        glyph = glyph.crop(box)
        side = int(round(max(glyph.width, glyph.height) * (1 + 2 * _MARGIN)))
        square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        image = square.convert("RGB").resize((self.image_size, self.image_size), Image.LANCZOS)
        return image, None


def _records(root: Path, split: str) -> list[dict]:
    return json.loads((root / f"{split}.json").read_text(encoding="utf-8"))


def build_new_style(root: str | os.PathLike, font_path: str | os.PathLike | None = None) -> dict | None:
    """Write the ``new_style`` splits into the emoji corpus at ``root``; return their manifest (None: no font).

    Reads the corpus's ``manifest.json`` (image size, which emoji each split holds) and its
    ``new_drawings.json`` / ``test.json`` (captions), draws each emoji with Noto into
    ``images/noto/`` and writes ``new_style.json``, ``new_style_test.json`` and
    ``new_style_manifest.json``. Idempotent: a second call with the same font and corpus keeps the files.
    """
    root = Path(root)
    font = Path(font_path) if font_path else noto_font_path()
    if font is None:
        logger.warning("new_style splits skipped: the Noto Color Emoji font is not installed "
                       "(apt-get install fonts-noto-color-emoji, or set CODIS_NOTO_FONT)")
        return None
    manifest_path = root / "manifest.json"
    try:
        corpus = json.loads(manifest_path.read_text(encoding="utf-8"))
        image_size = int(corpus["config"]["image_size"])
        emoji_by_key = {e["key"]: e for e in corpus["emoji"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path}: not a readable emoji corpus manifest ({error})") from None
    identity = {"recipe": NEW_STYLE_RECIPE, "font_sha256": sha256_file(font), "image_size": image_size,
                "corpus_files": {f"{s}.json": corpus["files"].get(f"{s}.json") for s in NEW_STYLE_SPLITS.values()}}
    previous = _read_manifest(root)
    if previous and previous.get("identity") == identity and _files_intact(root, previous):
        return previous
    renderer = _NotoRenderer(font, image_size)
    out_dir = root / "images" / NOTO_STYLE
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    files, skipped, counts = {}, {}, {}
    for split, source in NEW_STYLE_SPLITS.items():
        rows, records = [], _records(root, source)
        for record in records:
            key = Path(record["image"]).stem
            char = emoji_by_key[key]["char"]
            image, why = renderer.render(char)
            if image is None:
                skipped[key] = why
                continue
            rel = f"images/{NOTO_STYLE}/{key}.png"
            image.save(root / rel, format="PNG", optimize=False)
            files[rel] = sha256_file(root / rel)
            rows.append({"image": rel, "caption": list(record["caption"])})
        files[f"{split}.json"] = write_json(root / f"{split}.json", rows)
        counts[split] = {"images": len(rows), "of": len(records), "drawn_from": source}
    manifest = {"identity": identity, "font": str(font), "licence": NOTO_LICENCE, "counts": counts,
                "skipped": dict(sorted(skipped.items())), "files": files}
    write_json(root / NEW_STYLE_MANIFEST, manifest)
    logger.info("new_style splits in %s: %s", root,
                ", ".join(f"{s} {c['images']} of {c['of']}" for s, c in counts.items()))
    return manifest


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / NEW_STYLE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _files_intact(root: Path, manifest: dict) -> bool:
    files = manifest.get("files", {})
    return all((root / rel).is_file() and sha256_file(root / rel) == digest for rel, digest in files.items())


def ensure_new_style(root: str | os.PathLike) -> bool:
    """Build the new_style splits of the corpus at ``root`` if the font is there; return whether they exist."""
    try:
        return build_new_style(root) is not None
    except (OSError, ValueError) as error:
        logger.warning("new_style splits skipped: %s", error)
        return False
