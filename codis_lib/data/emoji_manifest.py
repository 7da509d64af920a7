"""The emoji corpus's manifest: its format, counts per split, sha256 of every file, per-emoji table.

The manifest is what a later build trusts (images whose bytes match are reused) and refuses
(a folder built with other settings); it is written last, so a folder with a manifest is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from codis_lib.data.emoji_concepts import SPLITS
from codis_lib.data.emoji_render import RENDER_RECIPE
from codis_lib.data.emoji_sources import ART_STYLES, source_versions

MANIFEST_FORMAT = 1
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


def reusable_manifest(manifest_path: Path, config: dict, force: bool) -> dict | None:
    """Return the manifest of the corpus already in the folder if it can be trusted for reuse, else None.

    A corpus built with other settings is refused (ValueError) unless ``force``; a forced
    rebuild, or one over an older manifest format, trusts nothing of the old folder.
    """
    if not manifest_path.is_file():
        return None
    previous = json.loads(manifest_path.read_text(encoding="utf-8"))
    if previous.get("config") != config and not force:
        raise ValueError(
            f"{manifest_path}: existing corpus was built with {previous.get('config')}, "
            f"asked for {config}; pass force=True (--force) to rebuild it, or use another out_dir"
        )
    if previous.get("format") != MANIFEST_FORMAT or previous.get("config") != config:
        return None  # forced rebuild: trust nothing
    return previous


def split_counts(plan: dict, records: dict[str, list]) -> dict[str, dict]:
    """Return the manifest's per-split counts: emoji, base concepts, images (per style), captions, records."""
    per_split = {}
    for split in SPLITS:
        split_emojis = [e for e in plan["emojis"] if plan["splits"][e.key] == split]
        split_images = [(s, e) for sp, s, e in plan["images"] if sp == split]
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
             "base_concept": plan["concepts"][e.key], "split": plan["splits"][e.key]}
            for e in plan["emojis"]
        ],
        "images": dict(sorted(image_hashes.items())),
    }
