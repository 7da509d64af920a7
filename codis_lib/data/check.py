"""`codis-check-data`: find the records of an ALBEF annotation file that training should not see, and drop them.

    codis-check-data data/coco_train.json --image-root data/coco          # -> data/coco_train.clean.json
    codis-check-data data/emoji/pretrain.json --out /tmp/pretrain.clean.json --workers 2

The file is read in any of ALBEF's formats (`codis_lib.data.albef_json`: pretraining lists with a caption
string or list, retrieval training with ``image_id``, retrieval test with caption lists). A file that
is not JSON, not a list, or has a record without ``image`` / ``caption`` (or, in a retrieval training
file, without ``image_id``) is bad input: one-line error naming the file and record, exit 2. Every other
problem drops the record, for one reason, checked in this order:

- ``outside_root``: the image path is absolute outside the image root, climbs out of it with ``..``, or
  is a symbolic link (or lies in a linked folder) leading outside the root's real folder (kept, and its
  image checked, with ``--allow-outside-root``: ALBEF's 4M lists use absolute paths; a corpus whose
  images live in a linked folder elsewhere is checked with ``--image-root`` set to that folder);
- ``bad_caption``: a caption that is not a string or a list of strings (a number, ``null``, a list holding one);
- ``empty_caption``: a caption (any caption of a list; or an empty list) that is empty after ALBEF's
  cleaning (`pre_caption`): empty, whitespace only, or only the punctuation it deletes;
- ``long_caption``: a caption of more than ``--max-words`` whitespace-separated words (default 100) or
  ``--max-chars`` characters (default 1000). The readers keep the first 30 words of any caption, as
  ALBEF does, so 31-100 words are merely truncated; past that the text is rarely a caption (a page of
  text, captions concatenated by a broken export, an encoded blob);
- ``missing_image``, ``undecodable_image``, ``truncated_image``, ``wrong_mode``: the image file, checked by
  `codis_lib.data.image_check` with the training decoder (`codis_lib.data.decode`, which converts modes 1,
  L, LA, La, P, PA, I;16*, I, F, RGB, RGBX, RGBA, RGBa, CMYK, YCbCr and HSV exactly to 8-bit RGB with
  transparency composited on white, and has no conversion for any other mode);
- ``duplicate``: the same image file and the same caption(s) after ALBEF's cleaning (a caption list compared
  as a set) as an earlier kept record; the first is kept. The same image with *another* caption is kept:
  COCO gives each image five, one record each in retrieval training. A retrieval test file that lists an
  image in several records is evaluated with the captions merged (`merge_duplicate_images`); the report
  counts such images under ``notes``.

A record is dropped whole (a list with one bad caption too), as the readers do, and kept records are
written unchanged, in order, in the input's JSON layout (a byte copy when nothing is dropped). The input
is never modified. Beside the cleaned file go ``<name>.report.json`` (counts by reason, every dropped
record with its index, image, reason and problem) and ``<name>.manifest.json`` (sha256 of the input and
cleaned files, counts, image root, date, tool version), which the trainer logs when it trains on the
cleaned file (`data_check_of`). Images are checked in parallel and cached by path, size and mtime
(``.codis-check-cache.jsonl`` beside the output, or ``--cache``), so a rerun decodes only new or changed files.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from codis_lib.cli_args import OneLineParser
from codis_lib.data.albef_json import (AnnotationError, describe_outside, load_json_list, outside_root, pre_caption,
                                      resolve_image_path)
from codis_lib.data.check_outputs import cache_location, check_writable, refuse_overwriting_inputs
from codis_lib.data.image_check import (CHECKER_VERSION, IMAGE_REASONS, ImageCheckStats, check_image_files,
                                        default_workers)

__all__ = ["REASONS", "DEFAULT_MAX_WORDS", "DEFAULT_MAX_CHARS", "MANIFEST_TOOL", "CheckResult", "output_paths",
           "check_annotations", "format_summary", "data_check_of", "describe_data_checks", "file_sha256", "main"]

REASONS = ("outside_root", "bad_caption", "empty_caption", "long_caption") + IMAGE_REASONS + ("duplicate",)
DEFAULT_MAX_WORDS = 100
DEFAULT_MAX_CHARS = 1000
MANIFEST_TOOL = "codis-check-data"
CACHE_NAME = ".codis-check-cache.jsonl"
_WHOLE = 10 ** 9  # pre_caption's word limit when comparing whole captions


@dataclass
class CheckResult:
    """What `check_annotations` wrote, and the report and manifest it wrote there."""

    cleaned: Path
    report_path: Path
    manifest_path: Path
    report: dict
    manifest: dict


def output_paths(annotation: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, Path, Path]:
    """Return (cleaned JSON, report, manifest): ``out`` or ``<input>.clean.json`` beside the input, and its siblings."""
    annotation = Path(annotation)
    cleaned = Path(out) if out is not None else annotation.with_name(f"{_stem(annotation)}.clean.json")
    stem = _stem(cleaned)
    return cleaned, cleaned.with_name(f"{stem}.report.json"), cleaned.with_name(f"{stem}.manifest.json")


def _stem(path: Path) -> str:
    return path.name[:-len(".json")] if path.name.endswith(".json") else path.name


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("codis-lib")
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | os.PathLike) -> str:
    """Return the SHA-256 of a file's bytes, read once per (path, size, mtime) in this process.

    The trainer asks twice at start-up for each training file (its data-check manifest and the resume
    record of the data order); a large annotation list is then read once.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256_of(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: the cache key, not read here
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ records
def _validate(path: str, data: list) -> str:
    """Raise AnnotationError at the first record the readers could not read; return the file's format."""
    with_id = next((i for i, r in enumerate(data) if isinstance(r, dict) and "image_id" in r), None)
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise AnnotationError(path, index, f"expected a JSON object, found {type(record).__name__}")
        if not isinstance(record.get("image"), str) or not record["image"]:
            raise AnnotationError(path, index, "record has no 'image' string")
        if "caption" not in record:
            raise AnnotationError(path, index, "record has no 'caption'")
        image_id = record.get("image_id")
        if with_id is not None and (not isinstance(image_id, (str, int)) or isinstance(image_id, bool)):
            raise AnnotationError(path, index, f"record has no 'image_id' (string or integer), which record {with_id} "
                                               f"has: a retrieval training file needs one on every record")
    if with_id is not None:
        return "retrieval_train"
    kinds = {type(r["caption"]) for r in data if _caption_type_problem(r["caption"]) is None}
    return {frozenset({list}): "caption_lists", frozenset({str}): "caption_strings"}.get(frozenset(kinds), "mixed")


def _captions(record: dict) -> list[str]:
    caption = record["caption"]
    return caption if isinstance(caption, list) else [caption]


def _caption_type_problem(caption) -> str | None:
    """Return why a record's caption is neither a string nor a list of strings (a number, null...), else None."""
    if isinstance(caption, str) or (isinstance(caption, list) and all(isinstance(c, str) for c in caption)):
        return None
    return f"caption must be a string or a list of strings, found {json.dumps(caption)[:80]}"


def _text_problem(caption, max_words: int, max_chars: int) -> tuple[str, str] | None:
    """Return (reason, problem) for a caption that is not text, or the first empty or over-long one, else None."""
    if (problem := _caption_type_problem(caption)) is not None:
        return "bad_caption", problem
    captions = caption if isinstance(caption, list) else [caption]
    if not captions:
        return "empty_caption", "caption list is empty"
    for caption in captions:
        if not pre_caption(caption, _WHOLE).strip():
            return "empty_caption", f"caption {caption[:80]!r} is empty after ALBEF's cleaning"
        words = len(caption.split())
        if words > max_words or len(caption) > max_chars:
            return "long_caption", (f"caption of {words} words, {len(caption)} characters (limits: --max-words "
                                    f"{max_words}, --max-chars {max_chars}): {caption[:60]!r}...")
    return None


def _find_defects(path: str, data: list, image_root, resolved: list[str], *, max_words: int, max_chars: int,
                  allow_outside_root: bool, cache, workers: int,
                  progress: bool) -> tuple[dict[int, tuple[str, str]], dict, ImageCheckStats]:
    """Return ({index: (reason, problem)} of the records to drop, notes, image stats); ``resolved``: the image paths."""
    dropped: dict[int, tuple[str, str]] = {}
    for index, record in enumerate(data):
        root = outside_root(record["image"], resolved[index], image_root, path)
        if root is not None and not allow_outside_root:
            dropped[index] = ("outside_root", describe_outside(record["image"], resolved[index], root))
        elif (problem := _text_problem(record["caption"], max_words, max_chars)) is not None:
            dropped[index] = problem
    images, stats = check_image_files([resolved[i] for i in range(len(data)) if i not in dropped], cache=cache,
                                      workers=workers, progress=progress)
    first: dict[tuple, int] = {}
    per_image: Counter = Counter()
    for index, record in enumerate(data):
        if index in dropped:
            continue
        reason, problem = images[resolved[index]]
        if reason is not None:
            dropped[index] = (reason, problem)
            continue
        key = (resolved[index], frozenset(pre_caption(c, _WHOLE) for c in _captions(record)))
        if key in first:
            dropped[index] = ("duplicate", f"same image and caption(s) as record {first[key]}")
            continue
        first[key] = index
        per_image[resolved[index]] += 1
    several = [n for n in per_image.values() if n > 1]
    notes = {"images_kept": len(per_image), "images_with_several_records": len(several),
             "records_sharing_an_image": sum(several)}
    return dict(sorted(dropped.items())), notes, stats


# ------------------------------------------------------------------------------------------ outputs
def _write_cleaned(source: Path, text: str, kept: list, complete: bool, cleaned: Path) -> None:
    """Write the kept records to ``cleaned`` atomically: the input's bytes when nothing was dropped, else its layout."""
    temporary = cleaned.with_name(f".{cleaned.name}.tmp")
    if complete:
        shutil.copyfile(source, temporary)
    else:
        layout = re.match(r"\[[ \t]*\r?\n([ \t]*)\S", text)
        indent = None if layout is None else ("\t" if "\t" in layout.group(1) else len(layout.group(1)))
        body = json.dumps(kept, indent=indent, ensure_ascii=text.isascii())
        temporary.write_text(body + ("\n" if text.endswith("\n") else ""), encoding="utf-8")
    os.replace(temporary, cleaned)


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def check_annotations(annotation: str | os.PathLike, image_root: str | os.PathLike | None = None,
                      out: str | os.PathLike | None = None, *, workers: int | None = None,
                      max_words: int = DEFAULT_MAX_WORDS, max_chars: int = DEFAULT_MAX_CHARS,
                      allow_outside_root: bool = False, cache: str | os.PathLike | None | bool = True,
                      progress: bool = True) -> CheckResult:
    """Check ``annotation`` and write the cleaned JSON, report and manifest (see the module docstring).

    ``image_root=None``: the annotation file's folder (the readers' default). ``cache``: True for
    ``.codis-check-cache.jsonl`` beside the output, a path, or False / None for none. Raises
    AnnotationError / ValueError (one line) for bad input.
    """
    started = time.perf_counter()
    source = Path(annotation)
    if image_root is not None and not Path(image_root).is_dir():
        raise ValueError(f"--image-root {image_root}: not a folder")
    if max_words < 1 or max_chars < 1:
        raise ValueError(f"--max-words {max_words} / --max-chars {max_chars}: must be at least 1")
    cleaned, report_path, manifest_path = output_paths(source, out)
    cache_path = cache_location(cache, cleaned, CACHE_NAME)
    outputs = {"--out": cleaned, "--out's report": report_path, "--out's manifest": manifest_path,
               "--cache": cache_path}
    refuse_overwriting_inputs(source, outputs, ())  # the images once the records are read
    data = load_json_list(source)
    file_format = _validate(str(source), data)
    resolved = [os.path.normpath(os.path.abspath(resolve_image_path(r["image"], image_root, str(source))))
                for r in data]
    refuse_overwriting_inputs(source, outputs, resolved)
    check_writable(outputs)  # before decoding any image, not after
    dropped, notes, stats = _find_defects(
        str(source), data, image_root, resolved, max_words=max_words, max_chars=max_chars,
        allow_outside_root=allow_outside_root, cache=cache_path, workers=workers or default_workers(),
        progress=progress)
    kept = [record for index, record in enumerate(data) if index not in dropped]
    _write_cleaned(source, source.read_text(encoding="utf-8"), kept, not dropped, cleaned)
    counts = Counter(reason for reason, _ in dropped.values())
    root = os.path.abspath(source.parent if image_root is None else image_root)
    options = {"max_words": max_words, "max_chars": max_chars, "allow_outside_root": allow_outside_root}
    report = {"input": str(source), "image_root": root, "format": file_format, "records": len(data),
              "kept": len(kept), "dropped": len(dropped), "counts": {reason: counts[reason] for reason in REASONS},
              "dropped_records": [{"index": i, "image": data[i]["image"], "reason": reason, "problem": problem}
                                  for i, (reason, problem) in dropped.items()],
              "notes": notes, "images": vars(stats), "options": options,
              "seconds": round(time.perf_counter() - started, 3)}
    manifest = {"tool": MANIFEST_TOOL, "tool_version": _tool_version(), "checker_version": CHECKER_VERSION,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "input": {"path": os.path.abspath(source), "sha256": file_sha256(source), "records": len(data)},
                "cleaned": {"path": os.path.abspath(cleaned), "sha256": file_sha256(cleaned), "records": len(kept)},
                "image_root": root, "format": file_format, "dropped": len(dropped), "counts": report["counts"],
                "options": options, "report": report_path.name}
    _write_json(report_path, report)
    _write_json(manifest_path, manifest)
    return CheckResult(cleaned=cleaned, report_path=report_path, manifest_path=manifest_path, report=report,
                       manifest=manifest)


def format_summary(result: CheckResult, first: int = 5) -> str:
    """Return the printed summary: counts, image statistics, the first dropped records, the files written."""
    report, images = result.report, result.report["images"]
    lines = [f"{report['input']} (image root {report['image_root']}, {report['format']}): {report['records']} records, "
             f"{images['images']} images ({images['decoded']} decoded, {images['from_cache']} from the cache, "
             f"{images['missing']} missing) in {report['seconds']:.1f} s",
             f"  kept {report['kept']}, dropped {report['dropped']}: "
             + ", ".join(f"{reason} {count}" for reason, count in report["counts"].items())]
    notes = report["notes"]
    if notes["images_with_several_records"]:
        why = ("the retrieval evaluation merges their captions" if report["format"] == "caption_lists"
               else "normal: one record per caption")
        lines.append(f"  kept: {notes['images_with_several_records']} images have several records with other "
                     f"captions ({notes['records_sharing_an_image']} records; {why})")
    lines += [f"  record {r['index']}: {r['reason']}: {r['problem']}" for r in report["dropped_records"][:first]]
    if report["dropped"] > first:
        lines.append(f"  ... {report['dropped'] - first} more in {result.report_path}")
    lines.append(f"  wrote {result.cleaned}, {result.report_path.name}, {result.manifest_path.name}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ training's side
def data_check_of(train_file: str | os.PathLike) -> dict | None:
    """Return what the trainer logs about the `codis-check-data` manifest beside ``train_file``, or None if none.

    {"file", "manifest", "manifest_sha256", "matches" (the file's sha256 is the manifest's cleaned one),
    "dropped", "records" (of the input), "tool_version", "date"}. A manifest of another tool is ignored.
    """
    train_file = Path(train_file)
    manifest_path = output_paths(train_file, train_file)[2]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("tool") != MANIFEST_TOOL:
        return None
    return {"file": str(train_file), "manifest": str(manifest_path), "manifest_sha256": file_sha256(manifest_path),
            "matches": (manifest.get("cleaned") or {}).get("sha256") == file_sha256(train_file),
            "dropped": manifest.get("dropped"), "records": (manifest.get("input") or {}).get("records"),
            "tool_version": manifest.get("tool_version"), "date": manifest.get("date")}


def describe_data_checks(checks: list[dict]) -> str:
    """Return ", data checked: ..." for the start line (one clause per checked training file), or ""."""
    parts = []
    for check in checks:
        name = Path(check["file"]).name
        if check["matches"]:
            parts.append(f"{name} by {MANIFEST_TOOL} {check['tool_version']} on {str(check['date'])[:10]}, "
                         f"{check['dropped']} of {check['records']} records dropped, manifest sha256 "
                         f"{check['manifest_sha256'][:12]}")
        else:
            parts.append(f"{name} CHANGED since its check (sha256 differs from {Path(check['manifest']).name})")
    return f", data checked: {'; '.join(parts)}" if parts else ""


# ------------------------------------------------------------------------------------------ command line
def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="codis-check-data", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Check an ALBEF annotation JSON and its images (missing, undecodable, truncated, unsupported "
                    "mode, duplicate, empty or over-long caption, path outside the image root); write the cleaned "
                    "JSON, a report and a manifest.")
    parser.add_argument("annotation", help="ALBEF annotation JSON (pretraining, retrieval training or test format)")
    parser.add_argument("--image-root", default=None, help="folder the image paths are relative to "
                                                           "(default: the JSON file's folder)")
    parser.add_argument("--out", default=None, help="cleaned JSON (default: ANNOTATION.clean.json beside the input)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="image-checking processes")
    parser.add_argument("--max-words", type=int, default=DEFAULT_MAX_WORDS, help="longest caption kept, in words")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="longest caption kept, in characters")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="keep records whose image is outside the image root (absolute paths, '..')")
    parser.add_argument("--cache", default=None, help=f"image-check cache file, or a folder to keep {CACHE_NAME} in "
                                                      f"(default: {CACHE_NAME} beside the output)")
    parser.add_argument("--no-cache", action="store_true", help="decode every image, keep no cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fail-on-defects", action="store_true", help="exit 1 when any record is dropped")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `codis-check-data`; returns the exit status (2 for bad input, with one line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        if args.workers < 1:
            raise ValueError(f"--workers {args.workers}: must be at least 1")
        result = check_annotations(args.annotation, args.image_root, args.out, workers=args.workers,
                                   max_words=args.max_words, max_chars=args.max_chars,
                                   allow_outside_root=args.allow_outside_root,
                                   cache=False if args.no_cache else (args.cache or True),
                                   progress=not args.no_progress)
    except (OSError, ValueError) as error:
        lines = str(error).strip().splitlines()
        print(f"codis-check-data: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codis-check-data: interrupted; the images checked so far are cached, run it again to continue",
              file=sys.stderr)
        return 130
    print(format_summary(result))
    return 1 if args.fail_on_defects and result.report["dropped"] else 0


if __name__ == "__main__":
    sys.exit(main())
