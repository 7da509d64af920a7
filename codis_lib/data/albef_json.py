"""Readers for ALBEF's annotation files, and ALBEF's caption cleaning.

ALBEF (salesforce/ALBEF, ``dataset/caption_dataset.py``) reads three kinds of JSON list:

- pretraining (``pretrain_dataset``): ``{"image": path, "caption": str or [str, ...]}``; a list
  means "draw one caption at random each time the image is seen";
- retrieval training (``re_train_dataset``): ``{"image": path, "caption": str, "image_id": id}``,
  one record per (image, caption) pair; records sharing ``image_id`` are positives of each other;
- retrieval evaluation (``re_eval_dataset``): ``{"image": path, "caption": [str, ...]}``, one
  record per image with all of its captions.

The same readers serve COCO / Flickr30K / the 4M pretraining lists and the emoji corpus built by
``codis_lib.data.emoji_corpus``. Unlike ALBEF's, they check every record up front: a file that is
not a JSON list, a record without ``image`` or ``caption``, an empty caption, or a missing or
unreadable image raises :class:`AnnotationError` naming the file and the record index; with
``on_error="skip"`` the bad records are dropped and counted (in the log and in ``.skipped``).
A record whose image lies outside the image root (an absolute path elsewhere, ``..`` climbing out, or a
symbolic link leading out) is named in a warning (or refused with ``outside_root="raise"``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

# ALBEF's pre_caption deletes exactly these characters (dataset/utils.py); hyphens and slashes
# become spaces. Everything else (digits, '&', accents, curly quotes) is kept.
_ALBEF_DELETED_PUNCTUATION = re.compile(r"([,.'!?\"()*#:;~])")
_ALBEF_RUN_OF_WHITESPACE = re.compile(r"\s{2,}")
ALBEF_DELETED_CHARACTERS = frozenset(",.'!?\"()*#:;~")

CHECK_IMAGES_CHOICES = ("verify", "exists", "none")
ON_ERROR_CHOICES = ("raise", "skip")
OUTSIDE_ROOT_CHOICES = ("warn", "raise", "allow")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Return ``caption`` cleaned exactly as ALBEF's ``pre_caption`` does.

    Lower-case; delete ``, . ' ! ? " ( ) * # : ; ~``; hyphens and slashes become spaces;
    ``<person>`` becomes ``person``; runs of two or more whitespace characters become one space
    (a single tab or newline is kept, as in ALBEF); trailing newlines and surrounding spaces are
    stripped; at most ``max_words`` space-separated words are kept.
    """
    text = _ALBEF_DELETED_PUNCTUATION.sub("", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _ALBEF_RUN_OF_WHITESPACE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


class AnnotationError(ValueError):
    """A bad annotation file or record; the message names the file and, where there is one, the record index."""

    def __init__(self, path: str | os.PathLike, index: int | None, problem: str):
        self.path = str(path)
        self.index = index
        self.problem = problem
        where = f"{self.path}: record {index}" if index is not None else self.path
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class PretrainRecord:
    """One image of a pretraining list with its cleaned caption(s)."""

    image: str  # resolved path of the image file
    captions: tuple[str, ...]  # cleaned with pre_caption; one is drawn per visit
    source: str  # annotation file
    index: int  # position of the record in that file


@dataclass(frozen=True)
class RetrievalTrainRecord:
    """One (image, caption) pair of a retrieval training file."""

    image: str
    caption: str
    image_id: str | int  # as written in the file; datasets map it to a contiguous int
    source: str
    index: int


@dataclass(frozen=True)
class RetrievalEvalRecord:
    """One image of a retrieval test file with all of its cleaned captions."""

    image: str
    captions: tuple[str, ...]
    source: str
    index: int


@dataclass
class ReadResult:
    """Returned by the readers: the good records, and how many bad ones were skipped, by reason."""

    records: list
    skipped: Counter = field(default_factory=Counter)
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]


def load_json_list(path: str | os.PathLike) -> list:
    """Return the parsed JSON list in ``path``; raise AnnotationError if it is missing, not UTF-8 JSON, or not a list."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, None, "annotation file not found")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise AnnotationError(path, None, f"not valid JSON ({err})") from err
    except UnicodeDecodeError as err:  # its own message names no file
        raise AnnotationError(path, None, f"not UTF-8 text (byte {err.start}: {err.reason}); annotation JSON "
                                          f"files must be UTF-8") from err
    if not isinstance(data, list):
        raise AnnotationError(path, None, f"expected a JSON list of records, found {type(data).__name__}")
    return data


def resolve_image_path(image: str, image_root: str | os.PathLike | None, annotation_file: str | os.PathLike) -> str:
    """Return the path of ``image``: absolute paths as they are, relative ones under ``image_root``.

    ``image_root=None`` means "the folder of the annotation file", which is how the emoji corpus
    is laid out; ALBEF's COCO / Flickr30K configs pass the dataset's image folder explicitly.
    """
    if os.path.isabs(image):
        return image
    root = Path(annotation_file).parent if image_root is None else Path(image_root)
    return str(root / image)


def outside_root(image: str, resolved: str, image_root: str | os.PathLike | None,
                 annotation_file: str | os.PathLike) -> str | None:
    """Return the image root when the record's ``image`` leads outside it, else None.

    Outside: an absolute path elsewhere, ``..`` climbing out, or a path inside whose file or folder is a
    symbolic link to a place outside the root (links followed, `real_image_path`). The root is
    ``image_root``, or the annotation file's folder when it is None; it may itself be a link (it is
    compared by its real path too). ``..`` that stays inside the root is fine.
    """
    root = os.path.abspath(Path(annotation_file).parent if image_root is None else Path(image_root))
    target = os.path.abspath(resolved)
    if (os.path.isabs(image) or ".." in Path(image).parts) and not _within(root, target):
        return root
    return None if _within(_real_folder(root), real_image_path(target)) else root


def describe_outside(image: str, resolved: str, root: str) -> str:
    """Return the words for a record whose image `outside_root` found outside ``root``."""
    target = os.path.abspath(resolved)
    if _within(root, target):  # inside by its name: a link leads out
        return f"image {image!r} leads through a link to {real_image_path(target)}, outside the image root {root}"
    return f"image {image!r} is outside the image root {root}"


def real_image_path(path: str) -> str:
    """Return where ``path`` really leads, links followed: one cached realpath per folder and one lstat per file."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.realpath(path) if os.path.islink(path) else os.path.join(_real_folder(folder), name)


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _within(root: str, target: str) -> bool:
    try:
        return os.path.commonpath([root, target]) == root
    except ValueError:  # different drives
        return False


def check_image(path: str, how: str) -> str | None:
    """Return None if the image at ``path`` passes the check ``how``, else the problem in words."""
    if how == "none":
        return None
    if not os.path.isfile(path):
        return f"image file not found: {path}"
    if how == "verify":
        from PIL import UnidentifiedImageError

        from codis_lib.data.decode import ImageTooLargeError, open_image

        try:
            with open_image(path) as img:
                img.verify()  # parses the whole file (PNG chunks and CRCs) without decoding pixels
        except ImageTooLargeError as err:
            return str(err)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            return f"image file is corrupt or not an image: {path} ({err})"
    return None


def _as_list(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [str(paths)]
    return [str(p) for p in paths]


def _check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {tuple(choices)}")


def _clean_one_caption(raw, max_words: int) -> tuple[str | None, str | None]:
    """Return (cleaned caption, None) or (None, problem)."""
    if not isinstance(raw, str):
        return None, f"caption must be a string, found {type(raw).__name__}"
    cleaned = pre_caption(raw, max_words)
    if not cleaned.strip():
        return None, f"caption is empty after ALBEF cleaning: {raw!r}"
    return cleaned, None


class _Reader:
    """Shared loop: validate each record, raise or skip-and-count, log the skips."""

    def __init__(self, kind: str, on_error: str, check_images: str, outside_root: str = "warn"):
        _check_choice("on_error", on_error, ON_ERROR_CHOICES)
        _check_choice("check_images", check_images, CHECK_IMAGES_CHOICES)
        _check_choice("outside_root", outside_root, OUTSIDE_ROOT_CHOICES)
        self.kind = kind
        self.on_error = on_error
        self.check_images = check_images
        self.outside_root = outside_root
        self.skipped: Counter = Counter()
        self.outside: dict[str, list] = {}  # annotation file -> [count, first record index, its path, the root]

    def bad(self, path: str, index: int, reason: str, problem: str) -> None:
        if self.on_error == "raise":
            raise AnnotationError(path, index, problem)
        self.skipped[reason] += 1
        logger.debug("skipping %s: record %d: %s", path, index, problem)

    def finish(self, records: list, files: list[str]) -> ReadResult:
        for path, (count, index, image, root) in self.outside.items():
            logger.warning("%s: %d record(s) name an image outside the image root %s (first: record %d: %s); "
                           "pass image_root, or outside_root='raise' to refuse such records", path, count, root,
                           index, image)
        if self.skipped:
            total = sum(self.skipped.values())
            logger.warning(
                "%s annotations %s: skipped %d bad record(s) of %d (%s)",
                self.kind, ", ".join(files), total, total + len(records),
                ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items())),
            )
        return ReadResult(records=records, skipped=self.skipped, files=tuple(files))

    def records_with_caption(self, paths: list[str]):
        """Yield (path, index, record) for every JSON object that has a 'caption' field; report the others bad."""
        for path in paths:
            for index, record in enumerate(load_json_list(path)):
                if not isinstance(record, dict):
                    self.bad(path, index, "not_a_record", f"expected a JSON object, found {type(record).__name__}")
                    continue
                if "caption" not in record:
                    self.bad(path, index, "missing_caption_field", "record has no 'caption'")
                    continue
                yield path, index, record

    def captions_of(self, raw_list: list, path: str, index: int, max_words: int) -> list[str] | None:
        """Return the cleaned captions of a record's caption list, or None after reporting it bad (empty or unusable)."""
        if not raw_list:
            self.bad(path, index, "empty_caption", "caption list is empty")
            return None
        captions, problem = _clean_caption_list(raw_list, max_words)
        if problem:
            self.bad(path, index, _problem_kind(problem), problem)
            return None
        return captions

    def read(self, paths: list[str], image_root, make_record, own_fields) -> ReadResult:
        """Return the records of ``paths``: ``own_fields(path, index, record)`` checks a record's own fields
        (captions, image_id) and returns them as keyword arguments of ``make_record``, or None after reporting
        the record bad; the image is checked after them, then ``make_record(image=, source=, index=, **fields)``."""
        records = []
        for path, index, record in self.records_with_caption(paths):
            fields = own_fields(path, index, record)
            if fields is None:
                continue
            image = self.image_of(record, path, index, image_root)
            if image is None:
                continue
            records.append(make_record(image=image, source=path, index=index, **fields))
        return self.finish(records, paths)

    def image_of(self, record, path: str, index: int, image_root) -> str | None:
        """Return the resolved image path of ``record``, or None after reporting it bad."""
        image = record.get("image")
        if not isinstance(image, str) or not image:
            self.bad(path, index, "missing_image_field", "record has no 'image' string")
            return None
        resolved = resolve_image_path(image, image_root, path)
        root = None if self.outside_root == "allow" else outside_root(image, resolved, image_root, path)
        if root is not None:
            if self.outside_root == "raise":
                raise AnnotationError(path, index, f"{describe_outside(image, resolved, root)} "
                                                   f"(outside_root='raise')")
            entry = self.outside.setdefault(path, [0, index, image, root])
            entry[0] += 1
        problem = check_image(resolved, self.check_images)
        if problem is not None:
            reason = "missing_image" if "not found" in problem else "corrupt_image"
            self.bad(path, index, reason, problem)
            return None
        return resolved


def _clean_caption_list(raw_list: list, max_words: int) -> tuple[list[str], str | None]:
    """Return (cleaned captions, None), or ([], problem) at the first caption that cannot be used."""
    captions = []
    for raw_caption in raw_list:
        cleaned, problem = _clean_one_caption(raw_caption, max_words)
        if problem:
            return [], problem
        captions.append(cleaned)
    return captions, None


def _problem_kind(problem: str) -> str:
    """Return the skip-counter name for a caption problem."""
    return "empty_caption" if "empty" in problem else "bad_caption"


def read_pretrain_annotations(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None = None,
    *,
    max_words: int = 30,
    on_error: str = "raise",
    check_images: str = "verify",
    outside_root: str = "warn",
) -> ReadResult:
    """Return the records of ALBEF pretraining lists (``image``, ``caption`` string or list), captions cleaned.

    ``check_images``: "verify" parses every image file (catches truncated or non-image files;
    about 0.1 ms per small image), "exists" only checks the file is there (use it for the 4M
    lists), "none" checks nothing here (a bad file then fails when it is decoded). ``outside_root``:
    a record whose image lies outside the image root (an absolute path elsewhere, ``..``, or a link
    leading out) is counted in one warning line per file naming the first such record ("warn"), refused with an
    AnnotationError ("raise"), or accepted silently ("allow", e.g. ALBEF's absolute 4M lists).
    """
    reader = _Reader("pretrain", on_error, check_images, outside_root)

    def own_fields(path: str, index: int, record: dict) -> dict | None:
        raw = record["caption"]
        captions = reader.captions_of(raw if isinstance(raw, list) else [raw], path, index, max_words)
        return None if captions is None else {"captions": tuple(captions)}

    return reader.read(_as_list(files), image_root, PretrainRecord, own_fields)


def read_retrieval_train(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None = None,
    *,
    max_words: int = 30,
    on_error: str = "raise",
    check_images: str = "verify",
    outside_root: str = "warn",
) -> ReadResult:
    """Return the records of ALBEF retrieval training files (``image``, ``caption``, ``image_id``), captions cleaned."""
    reader = _Reader("retrieval-train", on_error, check_images, outside_root)

    def own_fields(path: str, index: int, record: dict) -> dict | None:
        cleaned, problem = _clean_one_caption(record["caption"], max_words)
        if problem:
            reader.bad(path, index, _problem_kind(problem), problem)
            return None
        image_id = record.get("image_id")
        if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
            reader.bad(path, index, "missing_image_id", "record has no 'image_id' (string or integer)")
            return None
        return {"caption": cleaned, "image_id": image_id}

    return reader.read(_as_list(files), image_root, RetrievalTrainRecord, own_fields)


def read_retrieval_eval(
    file: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    max_words: int = 30,
    on_error: str = "raise",
    check_images: str = "verify",
    outside_root: str = "warn",
) -> ReadResult:
    """Return the records of an ALBEF retrieval test file (``image``, list of captions), captions cleaned.

    With ``on_error="skip"`` a record with any bad caption is dropped whole, so that the
    surviving images keep all the captions the benchmark gives them.
    """
    reader = _Reader("retrieval-eval", on_error, check_images, outside_root)

    def own_fields(path: str, index: int, record: dict) -> dict | None:
        raw = record["caption"]
        if not isinstance(raw, list):
            reader.bad(path, index, "bad_caption", f"retrieval test records need a list of captions, found {type(raw).__name__}")
            return None
        captions = reader.captions_of(raw, path, index, max_words)
        return None if captions is None else {"captions": tuple(captions)}

    return reader.read([str(file)], image_root, RetrievalEvalRecord, own_fields)
