"""The emoji corpus's manifest: its format, counts per split, sha256 of every file, per-emoji table.

The manifest is what a later build trusts (images whose bytes match are reused) and refuses
(a folder built with other settings or by an older builder); it is written last, so a folder with
a manifest is complete. A build goes only into a folder that is new, empty, or this builder's
(`check_corpus_folder`): it never overwrites a user's files. ``emoji_split_file`` is how readers find an evaluation split, with an error
that says how to rebuild a folder that lacks it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from codis_lib.data.emoji_concepts import ALL_EVAL_SPLITS, EVAL_SPLITS, IMAGE_SPLITS, STYLE_SPLITS
from codis_lib.data.emoji_render import RENDER_RECIPE
from codis_lib.data.emoji_sources import ART_STYLES, source_versions

# 1: train / val / test by base concept. 2: adds new_drawings (held-out drawings of training emoji),
# taken out of pretrain.json and train.json.
MANIFEST_FORMAT = 2
BUILDER = "codis-build-emoji"  # manifest.json's "builder": a folder the builder may rebuild
BUILD_MARKER = ".codis-build-emoji"  # written first into the folder it took, so an interrupted build can continue
# What a build writes at the top of its folder (the first one present is named when a foreign folder is refused).
CORPUS_ENTRIES = ("manifest.json", "pretrain.json", "train.json", "val.json", "test.json", "new_drawings.json",
                  "new_style.json", "new_style_test.json", "new_style_manifest.json", "tokenizer", "images")
LICENCES = {
    "twemoji": "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0",
    "openmoji": "All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0",
    "names": "Unicode CLDR short names via Unicode's emoji-test.txt (Unicode License v3)",
}


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data) -> str:
    """Write ``data`` as indented UTF-8 JSON, atomically; return the sha256 of the bytes written."""
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_corpus_manifest(path: Path) -> bool:
    """Return whether ``path`` is a manifest this builder wrote (any format, also before it named itself)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    older = isinstance(data.get("format"), int) and isinstance(data.get("config"), dict) and "split_salt" in data["config"]
    return data.get("builder") == BUILDER or older


def corpus_folder_is_ours(out: str | os.PathLike) -> bool:
    """Return whether the folder ``out`` was made by this builder: its marker, or a manifest.json of its own."""
    out = Path(out)
    return (out / BUILD_MARKER).is_file() or _is_corpus_manifest(out / "manifest.json")


def check_corpus_folder(out: str | os.PathLike, what: str = "--out-dir") -> None:
    """Raise a one-line ValueError unless the corpus may be built in ``out``: absent, empty, or made by this builder.

    The builder overwrites its JSON files and tokenizer and deletes PNGs it did not plan, so a folder
    holding anything else is refused, naming a file it would overwrite (or the first it holds).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out}: is a file, not a folder; give a new or empty folder (or an emoji corpus)")
    if not out.is_dir() or corpus_folder_is_ours(out):
        return
    entries = sorted(os.listdir(out))
    if not entries:
        return
    clash = next((name for name in CORPUS_ENTRIES if name in entries), entries[0])
    raise ValueError(f"{out / clash}: would be overwritten: {what} {out} holds files that codis-build-emoji did not "
                     f"write (no manifest.json of its own); give a new or empty folder")


def claim_corpus_folder(out: str | os.PathLike, what: str = "--out-dir") -> None:
    """Check ``out`` (`check_corpus_folder`), create it, and mark it as this builder's before anything is written.

    The marker lets a build that was interrupted before its manifest was written be run again in place.
    """
    check_corpus_folder(out, what)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / BUILD_MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"builder": BUILDER, "what": "the emoji corpus folder codis-build-emoji "
                                                                  "made; it rebuilds only such folders"}) + "\n")


def reusable_manifest(manifest_path: Path, config: dict, force: bool) -> dict | None:
    """Return the manifest of the corpus already in the folder if it can be trusted for reuse, else None.

    A corpus built by an older builder (another manifest format) or with other settings is
    refused (ValueError) unless ``force``; a forced rebuild trusts nothing of the old folder.
    """
    if not manifest_path.is_file():
        return None
    previous = json.loads(manifest_path.read_text(encoding="utf-8"))
    if previous.get("format") != MANIFEST_FORMAT and not force:
        raise ValueError(
            f"{manifest_path}: existing corpus has manifest format {previous.get('format')}, this builder writes "
            f"{MANIFEST_FORMAT} (adds the new_drawings split); pass force=True (--force) to rebuild it, "
            f"or use another out_dir"
        )
    if previous.get("config") != config and not force:
        raise ValueError(
            f"{manifest_path}: existing corpus was built with {previous.get('config')}, "
            f"asked for {config}; pass force=True (--force) to rebuild it, or use another out_dir"
        )
    if previous.get("format") != MANIFEST_FORMAT or previous.get("config") != config:
        return None  # forced rebuild: trust nothing
    return previous


def split_counts(plan: dict, records: dict[str, list]) -> dict[str, dict]:
    """Return the manifest's per-split counts: emoji, base concepts, images (per style), captions, records.

    A split's emoji are those with an image in it: a training emoji whose other drawing is in
    new_drawings counts in both (once in each).
    """
    per_split = {}
    for split in IMAGE_SPLITS:
        split_images = [(s, e) for sp, s, e in plan["images"] if sp == split]
        split_emojis = list({e.key: e for _, e in split_images}.values())
        per_split[split] = {
            "emoji": len(split_emojis),
            "base_concepts": len({plan["concepts"][e.key] for e in split_emojis}),
            "images": len(split_images),
            "images_per_style": {style: sum(1 for s, _ in split_images if s == style) for style in ART_STYLES},
            "captions": sum(len(plan["captions"][e.key]) for e in split_emojis),
            "records": len(records[split]),
        }
    return per_split


def manifest_of(plan: dict, config: dict, records: dict[str, list], file_hashes: dict[str, str],
                tokenizer_info: dict, image_hashes: dict[str, str]) -> dict:
    """Return the manifest written next to the corpus: format, settings, sources, counts, hashes, emoji table."""
    return {
        "format": MANIFEST_FORMAT,
        "builder": BUILDER,
        "render_recipe": RENDER_RECIPE,
        "config": config,
        "sources": {**source_versions(), "unicode_emoji": plan["unicode_version"]},
        "licences": dict(LICENCES),
        "counts": {
            "emoji_listed_fully_qualified": plan["emoji_listed"],
            "emoji": len(plan["emojis"]),
            "base_concepts": len({plan["concepts"][e.key] for e in plan["emojis"]}),
            "images": len(plan["images"]),
            "pretrain_records": len(records["pretrain"]),
            "splits": split_counts(plan, records),
        },
        "files": file_hashes,
        "tokenizer": tokenizer_info,
        "emoji": [
            {"key": e.key, "char": e.char, "name": e.name, "group": e.group, "subgroup": e.subgroup,
             "base_concept": plan["concepts"][e.key], "split": plan["splits"][e.key],
             "held_out_style": plan["held_out"].get(e.key)}
            for e in plan["emojis"]
        ],
        "images": dict(sorted(image_hashes.items())),
    }


def emoji_split_file(root: str | os.PathLike, split: str) -> Path:
    """Return ``root/<split>.json``, the evaluation file of ``split`` (one of ``ALL_EVAL_SPLITS``).

    Raises ValueError for another split name and FileNotFoundError, saying how to rebuild, when
    the corpus in ``root`` lacks the file (a folder built before new_drawings existed).
    """
    if split not in ALL_EVAL_SPLITS:
        raise ValueError(f"split={split!r}: the emoji corpus's evaluation splits are {', '.join(ALL_EVAL_SPLITS)}")
    root = Path(root)
    path = root / f"{split}.json"
    if path.is_file():
        return path
    if split in STYLE_SPLITS:
        raise FileNotFoundError(
            f"{path}: the emoji corpus in {root} has no {split!r} split (it needs the Noto Color Emoji font: "
            f"apt-get install fonts-noto-color-emoji, then `codis-build-emoji --out-dir {root}` adds it)")
    older = ""
    try:
        found = json.loads((root / "manifest.json").read_text(encoding="utf-8")).get("format")
        if found != MANIFEST_FORMAT:
            older = f" (built by an older builder: manifest format {found}, this one writes {MANIFEST_FORMAT})"
    except (OSError, ValueError, AttributeError):
        older = " (no readable manifest.json)"
    raise FileNotFoundError(
        f"{path}: the emoji corpus in {root} has no {split!r} split{older}; rebuild it with "
        f"`codis-build-emoji --out-dir {root} --force`, or build a new one with another --out-dir"
    )
