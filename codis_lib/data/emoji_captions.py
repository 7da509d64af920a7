"""Captions of the emoji corpus: CLDR name, subgroup and group phrases, letter-only aliases.

Returned raw (the readers apply ALBEF's ``pre_caption``); names stay unique after cleaning, and a
caption two emoji share is dropped, so that in retrieval every caption points at one image.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict

from codis_lib.data.albef_json import ALBEF_DELETED_CHARACTERS, pre_caption
from codis_lib.data.emoji_sources import Emoji


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


# Function words that say nothing about what a caption names (dropped from word lists and Grad-CAM panels).
CAPTION_STOPWORDS = frozenset(
    "a an the of and or with in on at to for from by is are its it this that as".split())
# The two templates of `captions_for`, raw or after `pre_caption` (which deletes ":" and ","): a group is one
# word or "word & word"; the suffix starts at the caption's last article (no subgroup holds "a" or "an").
_GROUP_PREFIX = re.compile(r"^\w+(?: & \w+)? emoji:? ")  # "<group> emoji: <name>"
_SUBGROUP_SUFFIX = re.compile(r",? an? (?:(?! an? ).)* emoji$")  # "<name>, a <subgroup> emoji"


def name_span(caption: str) -> tuple[int, int]:
    """Return (start, end) of the part of `caption` that names the emoji: the caption less the group prefix
    ("people & body emoji: ") or the subgroup suffix (", a person activity emoji") of `captions_for`'s
    templates, with or without ALBEF's cleaning; the whole caption for a name or an alias."""
    prefix = _GROUP_PREFIX.match(caption)
    suffix = _SUBGROUP_SUFFIX.search(caption)
    return (prefix.end() if prefix else 0), (suffix.start() if suffix else len(caption))


def _article(phrase: str) -> str:
    """Return the indefinite article ("a" or "an") for ``phrase``, by its first letter."""
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
