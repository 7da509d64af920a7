"""Build the offline emoji image-text corpus: real artwork (Twemoji, OpenMoji), real names (Unicode CLDR).

Every fully-qualified emoji of Unicode's ``emoji-test.txt`` that both art sets draw is rendered
on a white background at one size; its captions are its CLDR short name ("woman technologist:
medium skin tone", "flag: Japan") and natural variants (the CLDR subgroup and group phrases,
GitHub-style aliases from the ``emoji`` package). Splits are made by *base concept*: all
skin-tone, gender, hair and facing-direction variants of an emoji ("thumbs up", "thumbs up: dark
skin tone"; "technologist", "woman technologist") fall in the same split, so nothing of a test
concept is seen in training. A fourth split, ``new_drawings``, holds out one of the two drawings
of about a thousand training emoji: familiar concepts and captions, pictures never seen. The
corpus is written in ALBEF's JSON formats (see ``codis_lib.data.albef_json``) so that the same
loaders read it and COCO / Flickr30K.

Layout of ``out_dir``::

    images/twemoji/<codepoints>.png, images/openmoji/<codepoints>.png
    pretrain.json   ALBEF pretraining list {image, caption: [..]}: training images only
    train.json      retrieval training records {image, caption, image_id}: one per caption
    val.json        retrieval test records {image, caption: [..]}: one image per emoji
    test.json       idem, about 1000 images, like Flickr30K's test split
    new_drawings.json  idem, about 1000 held-out drawings of training emoji (not in pretrain/train.json)
    tokenizer/      WordPiece tokenizer trained on the training captions only
    manifest.json   counts, sources and versions, per-emoji table, sha256 of every file

Run ``codis-build-emoji --help``; a second run reuses every image whose sha256 matches the
manifest and re-renders only missing or altered ones.

This module holds the plan, the build and the command line; the pieces live in
``emoji_sources`` (Unicode's list, the art sets), ``emoji_concepts`` (base concepts, splits),
``emoji_captions``, ``emoji_render`` and ``emoji_manifest``. Their public names are importable
from here too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from codis_lib.cli_args import OneLineParser
from codis_lib.data.albef_json import pre_caption
from codis_lib.data.emoji_captions import caption_name, captions_for, corpus_captions
from codis_lib.data.emoji_concepts import (
    DEFAULT_NEW_DRAWINGS_IMAGES, DEFAULT_TEST_IMAGES, DEFAULT_VAL_IMAGES, EVAL_SPLITS, GENDER_SIGNS, GENDER_WORDS,
    HAIR_COMPONENTS, IMAGE_SPLITS, LINKED_CONCEPTS, NEW_DRAWINGS, NEW_DRAWINGS_SALT, PERSON_CODEPOINT_TO_NEUTRAL,
    RIGHTWARDS_ARROW, SKIN_TONES, SPLIT_SALT, SPLITS, VARIANT_QUALIFIERS, ZWJ, _limit_subset, assign_splits,
    base_concepts, eval_art_style, select_new_drawings,
)
from codis_lib.data.emoji_manifest import (
    MANIFEST_FORMAT, claim_corpus_folder, emoji_split_file, manifest_of, reusable_manifest, sha256_file, write_json,
)
from codis_lib.data.emoji_render import RENDER_RECIPE, render_images, render_openmoji, render_twemoji
from codis_lib.data.emoji_sources import (
    ART_STYLES, VARIATION_SELECTOR_16, Emoji, emoji_in_both_art_sets, emoji_test_path, file_key,
    openmoji_font_path, openmoji_svg_dir, read_emoji_test, source_versions, twemoji_files, twemoji_png_dir,
)

__all__ = [
    "ART_STYLES", "DEFAULT_NEW_DRAWINGS_IMAGES", "DEFAULT_TEST_IMAGES", "DEFAULT_VAL_IMAGES", "DEFAULT_VOCAB_SIZE",
    "EVAL_SPLITS", "GENDER_SIGNS", "GENDER_WORDS", "HAIR_COMPONENTS", "IMAGE_SPLITS", "LINKED_CONCEPTS",
    "MANIFEST_FORMAT", "NEW_DRAWINGS", "NEW_DRAWINGS_SALT", "PERSON_CODEPOINT_TO_NEUTRAL", "RENDER_RECIPE",
    "RIGHTWARDS_ARROW", "SKIN_TONES", "SPLITS", "SPLIT_SALT", "VARIANT_QUALIFIERS", "VARIATION_SELECTOR_16", "ZWJ",
    "Emoji", "assign_splits", "base_concepts", "build_emoji_corpus", "caption_name", "captions_for",
    "corpus_captions", "emoji_in_both_art_sets", "emoji_split_file", "emoji_test_path", "eval_art_style",
    "file_key", "main", "openmoji_font_path", "openmoji_svg_dir", "plan_corpus", "read_emoji_test",
    "render_images", "render_openmoji", "render_twemoji", "select_new_drawings", "sha256_file", "source_versions",
    "tokenizer_captions", "twemoji_files", "twemoji_png_dir",
]

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 4096


def plan_corpus(
    image_size: int = 64,
    limit: int | None = None,
    test_images: int = DEFAULT_TEST_IMAGES,
    val_images: int = DEFAULT_VAL_IMAGES,
    new_drawings_images: int = DEFAULT_NEW_DRAWINGS_IMAGES,
) -> dict:
    """Return the corpus plan (emoji, concepts, splits, held-out drawings, captions, images) without rendering.

    ``splits`` is the split of each emoji's base concept; ``held_out`` maps the training emoji
    that have one drawing in ``new_drawings`` to its style; ``images`` lists (image split, style,
    emoji). Splits and held-out drawings are chosen over the full list, so a ``limit`` subset
    agrees with the full corpus.
    """
    all_emojis, unicode_version = read_emoji_test()
    emojis = emoji_in_both_art_sets(all_emojis)
    concepts = base_concepts(emojis)
    splits = assign_splits(emojis, concepts, test_images=test_images, val_images=val_images)
    held_out = select_new_drawings(emojis, concepts, splits, images=new_drawings_images)
    if limit is not None:
        if limit < 3:
            raise ValueError(f"limit={limit}: need at least 3 emoji (one per split)")
        emojis = _limit_subset(emojis, concepts, splits, limit)
        held_out = {e.key: held_out[e.key] for e in emojis if e.key in held_out}
    captions = corpus_captions(emojis)
    images = []  # (split, style, emoji)
    for e in emojis:
        if splits[e.key] != "train":
            images.append((splits[e.key], eval_art_style(e.key), e))
            continue
        for style in ART_STYLES:
            images.append((NEW_DRAWINGS if held_out.get(e.key) == style else "train", style, e))
    return {
        "unicode_version": unicode_version,
        "emoji_listed": len(all_emojis),
        "emojis": emojis,
        "concepts": concepts,
        "splits": splits,
        "held_out": held_out,
        "captions": captions,
        "images": images,
        "twemoji_files": twemoji_files(),
    }


def _image_relpath(style: str, key: str) -> str:
    """Return the path of an image relative to the corpus folder (what the JSON files name)."""
    return f"images/{style}/{key}.png"


def _render_images(out: Path, plan: dict, previous: dict | None, image_size: int,
                   workers: int) -> tuple[dict[str, str], int, float]:
    """Reuse the images whose bytes match the manifest, render the rest, delete leftovers.

    Returns ({relative path: sha256} of every planned image, how many were rendered, seconds spent rendering).
    """
    for style in ART_STYLES:
        (out / "images" / style).mkdir(parents=True, exist_ok=True)
    same_recipe = (previous or {}).get("render_recipe") == RENDER_RECIPE
    known_hashes = (previous or {}).get("images", {}) if same_recipe else {}
    image_hashes: dict[str, str] = {}
    jobs = []
    for _, style, e in plan["images"]:
        rel = _image_relpath(style, e.key)
        path = out / rel
        if rel in known_hashes and path.is_file() and sha256_file(path) == known_hashes[rel]:
            image_hashes[rel] = known_hashes[rel]
            continue
        source = str(plan["twemoji_files"][e.key]) if style == "twemoji" else ""
        jobs.append((style, e.char, source, str(path)))
    render_started = time.perf_counter()
    if jobs:
        for path, digest in render_images(jobs, image_size, str(openmoji_font_path()), workers):
            image_hashes[Path(path).relative_to(out).as_posix()] = digest
    render_seconds = time.perf_counter() - render_started
    planned = {_image_relpath(style, e.key) for _, style, e in plan["images"]}
    for style in ART_STYLES:  # images left over from an earlier, different plan would confuse readers
        for stale in (out / "images" / style).glob("*.png"):
            if f"images/{style}/{stale.name}" not in planned:
                stale.unlink()
    return image_hashes, len(jobs), render_seconds


def _write_annotations(out: Path, plan: dict) -> tuple[dict[str, list], dict[str, str]]:
    """Write the ALBEF JSON files; return ({file stem: its records}, {file name: sha256})."""
    captions = plan["captions"]
    records: dict[str, list] = {"pretrain": [], "train": [], **{split: [] for split in EVAL_SPLITS}}
    for split, style, e in plan["images"]:
        rel = _image_relpath(style, e.key)
        if split == "train":
            records["pretrain"].append({"image": rel, "caption": list(captions[e.key])})
            # image_id is the emoji, not the file: its two drawings are positives of each other.
            records["train"].extend({"image": rel, "caption": c, "image_id": e.key} for c in captions[e.key])
        else:
            records[split].append({"image": rel, "caption": list(captions[e.key])})
    file_hashes = {f"{stem}.json": write_json(out / f"{stem}.json", rows) for stem, rows in records.items()}
    return records, file_hashes


def tokenizer_captions(plan: dict) -> list[str]:
    """Return the cleaned captions the tokenizer learns from: every caption of every training emoji, once per style.

    That is the text of train.json before any drawing was held out (emoji, style, caption
    order), so the vocabulary and token ids do not depend on which drawings form new_drawings:
    a held-out emoji's captions are all still in training, with its other drawing.
    """
    return [pre_caption(caption) for e in plan["emojis"] if plan["splits"][e.key] == "train"
            for _ in ART_STYLES for caption in plan["captions"][e.key]]


def _tokenizer(out: Path, training_captions: list[str], previous: dict | None,
               vocab_size: int) -> tuple[dict, bool]:
    """Return (the manifest's tokenizer entry, whether the tokenizer on disk was reused).

    The tokenizer is retrained only when the cleaned training captions, or the recipe, changed
    or its file no longer matches the manifest.
    """
    from codis_lib.data.tokenizer import TOKENIZER_RECIPE

    captions_digest = hashlib.sha256("\n".join(training_captions).encode("utf-8")).hexdigest()
    tokenizer_dir = out / "tokenizer"
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    previous_tokenizer = (previous or {}).get("tokenizer", {})
    if (previous_tokenizer.get("training_captions_sha256") == captions_digest
            and previous_tokenizer.get("recipe") == TOKENIZER_RECIPE and tokenizer_file.is_file()
            and sha256_file(tokenizer_file) == previous_tokenizer.get("sha256")):
        return previous_tokenizer, True
    from codis_lib.data.tokenizer import train_wordpiece

    tokenizer = train_wordpiece(training_captions, vocab_size=vocab_size, out_dir=tokenizer_dir)
    return {
        "path": "tokenizer",
        "recipe": TOKENIZER_RECIPE,
        "vocab_size": len(tokenizer),
        "requested_vocab_size": vocab_size,
        "training_captions": len(training_captions),
        "training_captions_sha256": captions_digest,
        "sha256": sha256_file(tokenizer_file),
    }, False


def build_emoji_corpus(
    out_dir: str | os.PathLike = "data/emoji",
    image_size: int = 64,
    *,
    force: bool = False,
    limit: int | None = None,
    workers: int = 2,
    test_images: int = DEFAULT_TEST_IMAGES,
    val_images: int = DEFAULT_VAL_IMAGES,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    new_drawings_images: int = DEFAULT_NEW_DRAWINGS_IMAGES,
) -> dict:
    """Return the manifest of the emoji corpus in ``out_dir``, building or repairing it as needed.

    Idempotent: images whose file matches the sha256 in an existing manifest are reused, others
    are (re)rendered; the JSON files are rewritten deterministically; the tokenizer is retrained
    only when the training captions changed. A corpus built with other settings (image size,
    limit, split sizes, vocabulary) or by an older builder (an older manifest format) is refused
    unless ``force=True``, because other runs may be reading it. A folder that holds files this
    builder did not write is always refused (ValueError naming one): only a new or empty folder,
    or one of its own, is built in.
    """
    if image_size < 8:
        raise ValueError(f"image_size={image_size}: too small to draw an emoji (use >= 8)")
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least 1")
    if limit is not None and limit < 3:
        raise ValueError(f"limit={limit}: need at least 3 emoji (one per split)")
    started = time.perf_counter()
    out = Path(out_dir)
    claim_corpus_folder(out)  # a new, empty or earlier corpus folder only: never a user's files
    config = {"image_size": image_size, "limit": limit, "test_images": test_images, "val_images": val_images,
              "vocab_size": vocab_size, "split_salt": SPLIT_SALT, "new_drawings_images": new_drawings_images,
              "new_drawings_salt": NEW_DRAWINGS_SALT}
    manifest_path = out / "manifest.json"
    previous = reusable_manifest(manifest_path, config, force)
    plan = plan_corpus(image_size=image_size, limit=limit, test_images=test_images, val_images=val_images,
                       new_drawings_images=new_drawings_images)
    image_hashes, rendered, render_seconds = _render_images(out, plan, previous, image_size, workers)
    records, file_hashes = _write_annotations(out, plan)
    tokenizer_info, tokenizer_reused = _tokenizer(out, tokenizer_captions(plan), previous, vocab_size)
    manifest = manifest_of(plan, config, records, file_hashes, tokenizer_info, image_hashes)
    write_json(manifest_path, manifest)
    from codis_lib.data.emoji_new_style import build_new_style

    new_style = build_new_style(out)  # the held-out art style; None (one warning) without the Noto font
    manifest["new_style"] = new_style["counts"] if new_style else None
    manifest["last_build"] = {
        "seconds": round(time.perf_counter() - started, 2),
        "render_seconds": round(render_seconds, 2),
        "images_rendered": rendered,
        "images_reused": len(plan["images"]) - rendered,
        "tokenizer_reused": tokenizer_reused,
        "workers": workers,
    }
    logger.info("emoji corpus in %s: %s", out, json.dumps(manifest["last_build"]))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line entry point of ``codis-build-emoji``; returns the exit status."""
    parser = OneLineParser(
        prog="codis-build-emoji",
        description="Render the offline emoji image-text corpus (Twemoji + OpenMoji art, Unicode CLDR names) "
                    "in ALBEF's JSON formats, with splits by base concept and a WordPiece tokenizer.",
    )
    parser.add_argument("--out-dir", default="data/emoji",
                        help="output folder: new, empty, or an earlier build's (default: data/emoji); a folder "
                             "holding other files is refused")
    parser.add_argument("--image-size", type=int, default=64,
                        help="side of the square images in pixels (default 64: CPU-friendly; the art is 72 px)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if out-dir holds a corpus built with other settings")
    parser.add_argument("--limit", type=int, default=None,
                        help="build only about this many emoji (whole concepts, all splits): for quick tests")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    parser.add_argument("--test-images", type=int, default=DEFAULT_TEST_IMAGES,
                        help="size of the test split in images (default 1000, like Flickr30K)")
    parser.add_argument("--val-images", type=int, default=DEFAULT_VAL_IMAGES, help="size of the val split (default 500)")
    parser.add_argument("--new-drawings-images", type=int, default=DEFAULT_NEW_DRAWINGS_IMAGES,
                        help="training emoji that lend one drawing to the new_drawings split (default 1000; "
                             "0 keeps both drawings of every training emoji in training)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="WordPiece vocabulary size (default 4096; the training captions need about that)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = build_emoji_corpus(
            args.out_dir, args.image_size, force=args.force, limit=args.limit, workers=args.workers,
            test_images=args.test_images, val_images=args.val_images, vocab_size=args.vocab_size,
            new_drawings_images=args.new_drawings_images,
        )
    except (ValueError, OSError) as error:  # bad arguments, a folder it may not build in, a full disk
        print(f"codis-build-emoji: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(f"emoji corpus in {args.out_dir}: {counts['emoji']} emoji, {counts['base_concepts']} base concepts, "
          f"{counts['images']} images")
    for split, c in counts["splits"].items():
        styles = ", ".join(f"{s} {n}" for s, n in c["images_per_style"].items())
        print(f"  {split:5s}: {c['images']:5d} images ({styles}), {c['emoji']} emoji, "
              f"{c['base_concepts']} concepts, {c['records']} records")
    if manifest["new_style"]:
        for split, c in manifest["new_style"].items():
            print(f"  {split}: {c['images']:5d} images (noto), {c['of'] - c['images']} of the {c['drawn_from']} "
                  f"emoji not drawn by the font")
    else:
        print("  new_style, new_style_test: skipped (no Noto Color Emoji font: apt-get install fonts-noto-color-emoji)")
    build = manifest["last_build"]
    print(f"  built in {build['seconds']:.1f} s: {build['images_rendered']} rendered, "
          f"{build['images_reused']} reused, tokenizer {'reused' if build['tokenizer_reused'] else 'trained'} "
          f"(vocab {manifest['tokenizer']['vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
