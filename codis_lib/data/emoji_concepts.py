"""Base concepts of the emoji corpus and its splits: train, val and test share no concept.

Two emoji share a base concept when they are skin-tone, gender, hair or facing-direction variants
of each other (found from code points and from CLDR names, closed transitively); val and test
take whole concepts, chosen by a salted stable hash, so nothing of a test concept is seen in
training and a ``--limit`` subset agrees with the full corpus. A fourth, image-level split,
``new_drawings``, holds out one of the two drawings of about a thousand *training* emoji: known
concepts and captions, new pictures (the setting of COCO's test images).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict

from codis_lib.data.emoji_sources import ART_STYLES, Emoji

SPLITS = ("train", "val", "test")
SPLIT_SALT = "codis-emoji-split-v1"  # changing it reshuffles which concepts are held out
DEFAULT_TEST_IMAGES = 1000  # like Flickr30K's 1K test split
DEFAULT_VAL_IMAGES = 500
NEW_DRAWINGS = "new_drawings"
EVAL_SPLITS = ("val", "test", NEW_DRAWINGS)  # the files <split>.json in the evaluation format
# Evaluation emoji drawn in an art family no training image comes from (codis_lib.data.emoji_new_style;
# built only where the Noto Color Emoji font is installed).
STYLE_SPLITS = ("new_style", "new_style_test")
ALL_EVAL_SPLITS = (*EVAL_SPLITS, *STYLE_SPLITS)
IMAGE_SPLITS = (*SPLITS, NEW_DRAWINGS)  # where an image goes: its concept's split, or new_drawings
NEW_DRAWINGS_SALT = "codis-emoji-new-drawings-v1"  # changing it reshuffles which drawings are held out
DEFAULT_NEW_DRAWINGS_IMAGES = 1000

SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})
HAIR_COMPONENTS = frozenset({"1f9b0", "1f9b1", "1f9b2", "1f9b3"})
ZWJ = "200d"
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


def _stable_rank(text: str, salt: str = SPLIT_SALT) -> str:
    """Return the salted sha256 of ``text``: a stable, well-spread sort key for concepts and emoji."""
    return hashlib.sha256(f"{salt}:{text}".encode("utf-8")).hexdigest()


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


def select_new_drawings(
    emojis: list[Emoji],
    concepts: dict[str, str],
    splits: dict[str, str],
    images: int = DEFAULT_NEW_DRAWINGS_IMAGES,
) -> dict[str, str]:
    """Return {emoji key: held-out art style} for about ``images`` training emoji, deterministic.

    Each chosen emoji keeps its other drawing in training; the held-out one forms the
    ``new_drawings`` split. Each CLDR group gets a share proportional to its training emoji;
    within a group the emoji are taken round-robin over its concepts (one variant of every
    concept, in the order of a salted hash, before a second variant of any), so the split
    covers as many training concepts as it can. The held-out styles alternate along another
    salted hash order: half Twemoji, half OpenMoji (one more of one when the count is odd).
    """
    if images < 0:
        raise ValueError(f"images={images}: the new_drawings split cannot have a negative size")
    train = [e for e in emojis if splits[e.key] == "train"]
    by_group: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for e in train:
        by_group[e.group][concepts[e.key]].append(e.key)
    chosen: list[str] = []
    for group in sorted(by_group):
        members = by_group[group]
        group_size = sum(len(keys) for keys in members.values())
        quota = round(images * group_size / len(train)) if train else 0
        concept_order = {c: i for i, c in enumerate(sorted(members, key=lambda c: _stable_rank(c, NEW_DRAWINGS_SALT)))}
        candidates = []  # (round, concept position, key): round r takes the r-th variant of every concept
        for concept, keys in members.items():
            for position, key in enumerate(sorted(keys, key=lambda k: _stable_rank(k, NEW_DRAWINGS_SALT))):
                candidates.append((position, concept_order[concept], key))
        chosen.extend(key for _, _, key in sorted(candidates)[:quota])
    by_style_rank = sorted(chosen, key=lambda k: _stable_rank(f"style:{k}", NEW_DRAWINGS_SALT))
    return {key: ART_STYLES[i % len(ART_STYLES)] for i, key in enumerate(by_style_rank)}


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
