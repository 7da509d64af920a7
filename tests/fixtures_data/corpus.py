"""Shared test data for tests/test_data_*.py: a small emoji corpus built once per session, COCO-style image folders."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent
SMALL_CORPUS_LIMIT = 60  # about 60 emoji: ~100 images, ~2 s to build on 2 cores
SMALL_CORPUS_SIZE = 32

# Image files the fixture JSONs name, and the Twemoji drawing each one gets (red heart, baby chick, right arrow).
FIXTURE_IMAGES = {
    "val2014/COCO_val2014_000000000001.jpg": "2764",
    "train2014/COCO_train2014_000000000002.jpg": "1f424",
    "train2014/COCO_train2014_000000000003.jpg": "27a1",
}


def _temporary_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def small_emoji_corpus() -> tuple[Path, dict]:
    """Return (folder, manifest) of a --limit emoji corpus at 32 px, built once per test session."""
    from codis_lib.data.emoji_corpus import build_emoji_corpus

    out = _temporary_dir("codis-emoji-") / "emoji"
    manifest = build_emoji_corpus(out, SMALL_CORPUS_SIZE, limit=SMALL_CORPUS_LIMIT, vocab_size=400)
    return out, manifest


def write_coco_style_images(root: Path) -> Path:
    """Write the JPEGs named by the fixture JSONs under ``root`` (72 px Twemoji art on white); return root."""
    from codis_lib.data.emoji_corpus import render_twemoji, twemoji_files

    files = twemoji_files()
    for relative, key in FIXTURE_IMAGES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        render_twemoji(str(files[key]), 72).save(path, format="JPEG", quality=90)
    return root
