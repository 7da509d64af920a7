"""Checking image files the way training will decode them, in parallel, with a cache that makes a rescan free.

`check_image_file` opens one file with Pillow, and classifies it as the datasets would meet it:

- ``missing_image``: no regular file at the path;
- ``undecodable_image``: not an image Pillow can identify, a decode error that is not a truncation
  (a corrupt PNG chunk, a broken data stream), or an image over Pillow's decompression-bomb limit
  (`codis_lib.data.decode.open_image`, as the readers open it);
- ``truncated_image``: the file ends early (Pillow's "image file is truncated" on decoding, or the
  "truncated PNG file" / "Truncated File Read" of ``verify()``, which parses the whole file: a PNG whose
  pixels are complete but whose end chunk is cut decodes, yet the readers' ``check_images="verify"``
  refuses it, so it is reported);
- ``wrong_mode``: a PIL mode that `codis_lib.data.decode.pil_to_rgb_array` has no conversion for
  (``LAB``, ``I;16S``, raw packings...; the supported ones are `SUPPORTED_MODES`).

A file that passes is decoded in full through `pil_to_rgb_array`, the training decoder itself.

`check_image_files` runs that over many paths (a pool of processes, a tqdm bar) and keeps a cache:
one JSON line per checked file, keyed by its absolute path, size and modification time (ns). A second
run, or a run after an interruption (each result is appended as it arrives), decodes only the files
that are new or changed since. The first line records `CHECKER_VERSION`; a cache of another version
is discarded, so that a change of the rules re-checks everything.
"""
from __future__ import annotations

import json
import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = ["IMAGE_REASONS", "CHECKER_VERSION", "check_image_file", "ImageCheckCache", "ImageCheckStats",
           "check_image_files", "default_workers"]

IMAGE_REASONS = ("missing_image", "undecodable_image", "truncated_image", "wrong_mode")
CHECKER_VERSION = 1
_CACHE_HEADER = "codis_check_cache"


def check_image_file(path: str) -> tuple[str | None, str]:
    """Return (None, "mode W x H") if the image at ``path`` decodes for training, else (reason, problem in words)."""
    from PIL import UnidentifiedImageError

    from codis_lib.data.decode import SUPPORTED_MODES, ImageTooLargeError, open_image, pil_to_rgb_array

    if not os.path.isfile(path):
        return "missing_image", f"image file not found: {path}"
    try:
        with open_image(path) as img:  # the readers' opener: the same decompression-bomb limit
            mode, size = img.mode, img.size
            if mode not in SUPPORTED_MODES:
                return "wrong_mode", (f"image mode {mode!r} has no conversion to RGB in codis_lib.data.decode "
                                      f"(supported: {', '.join(sorted(SUPPORTED_MODES))}): {path}")
            img.verify()  # the whole file: chunk structure, CRCs, the end marker
        with open_image(path) as img:
            img.load()
            pil_to_rgb_array(img)
    except UnidentifiedImageError as err:
        return "undecodable_image", f"not an image Pillow can identify: {path} ({err})"
    except ImageTooLargeError as err:
        return "undecodable_image", str(err)
    except Exception as err:  # noqa: BLE001 - one odd file must not stop a scan of millions
        words = str(err) or type(err).__name__
        reason = "truncated_image" if "truncated" in words.lower() else "undecodable_image"
        return reason, f"cannot decode {path}: {type(err).__name__}: {words}"
    return None, f"{mode} {size[0]}x{size[1]}"


def default_workers() -> int:
    """Return the default number of checking processes: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


class ImageCheckCache:
    """The results of earlier checks, {absolute path: (size, mtime_ns, reason, detail)}, appended to a JSON-lines file.

    ``path=None`` keeps nothing (every file is decoded). A last line cut by an interruption is ignored. A file
    at ``path`` that is not a cache (its first line is not a cache header of any version) is refused
    (ValueError naming it), never overwritten.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, tuple[int, int, str | None, str]] = {}
        self._handle = None
        if self.path is None:
            return
        lines, whole = self._read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewritten when of another version, mostly superseded lines, or ending in a cut line (which the next
        # line appended would join).
        if lines is None or not whole or lines > 2 * max(len(self.entries), 1):
            self._rewrite()
        self._handle = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered: an interruption loses nothing

    def _read(self) -> tuple[int | None, bool]:
        """Load the entries; return (number of lines or None when absent or of another version, ends with a newline)."""
        if not self.path.is_file():
            return None, True
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        lines = text.splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = None
        if lines and not (isinstance(header, dict) and _CACHE_HEADER in header):  # someone's file, not a cache
            raise ValueError(f"{self.path}: not an image-check cache (its first line is not one's header), and a "
                             f"cache would overwrite it; give a new file or a folder for the cache")
        if header.get(_CACHE_HEADER) != CHECKER_VERSION:
            return None, True
        for line in lines[1:]:
            try:
                item = json.loads(line)
                self.entries[item["path"]] = (int(item["size"]), int(item["mtime_ns"]), item["reason"], item["detail"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut by an interruption
        return len(lines), text.endswith("\n")

    def _rewrite(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(json.dumps({_CACHE_HEADER: CHECKER_VERSION}) + "\n")
                for path, entry in self.entries.items():
                    handle.write(self._line(path, entry))
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)  # left only when the write or the rename failed

    @staticmethod
    def _line(path: str, entry: tuple) -> str:
        size, mtime_ns, reason, detail = entry
        return json.dumps({"path": path, "size": size, "mtime_ns": mtime_ns, "reason": reason, "detail": detail}) + "\n"

    def lookup(self, path: str, size: int, mtime_ns: int) -> tuple[str | None, str] | None:
        """Return the cached (reason, detail) of ``path`` if it was checked at this size and mtime, else None."""
        entry = self.entries.get(path)
        if entry is None or entry[0] != size or entry[1] != mtime_ns:
            return None
        return entry[2], entry[3]

    def add(self, path: str, size: int, mtime_ns: int, reason: str | None, detail: str) -> None:
        """Record one result, on disk at once (one line: a write per image is nothing next to its decoding)."""
        self.entries[path] = (size, mtime_ns, reason, detail)
        if self._handle is not None:
            self._handle.write(self._line(path, self.entries[path]))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass
class ImageCheckStats:
    """How the images of one scan were checked."""

    images: int = 0  # distinct paths
    decoded: int = 0  # opened and decoded in this run
    from_cache: int = 0  # unchanged since a cached check
    missing: int = 0  # no file (never cached: a stat is the whole check)


def _stat(path: str) -> tuple[int, int] | None:
    """Return (size, mtime_ns) of the regular file at ``path``, or None when there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else None


def _check_job(job: tuple[str, int, int]) -> tuple[str, int, int, str | None, str]:
    path, size, mtime_ns = job
    return (path, size, mtime_ns, *check_image_file(path))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the pool


def _run_jobs(jobs: list, workers: int) -> Iterable[tuple]:
    """Yield the results of `_check_job` over ``jobs`` in order: in this process, or in a pool of ``workers``."""
    if workers <= 1 or len(jobs) < 64:
        yield from map(_check_job, jobs)
        return
    import multiprocessing

    # "spawn": the caller may be a process with thread pools running (a notebook, a trainer), which a fork
    # would copy in an undefined state; the workers import only Pillow, numpy and the decoder.
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_sigint)
    try:
        yield from pool.imap(_check_job, jobs, chunksize=32)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def check_image_files(paths: Iterable[str], *, cache: str | os.PathLike | None = None, workers: int = 1,
                      progress: bool = True) -> tuple[dict[str, tuple[str | None, str]], ImageCheckStats]:
    """Return ({path: (reason or None, detail)} for every distinct path, stats), decoding only unchecked files.

    ``cache``: the JSON-lines file of earlier results (created; None: no cache). Results are appended as
    they arrive, so an interrupted scan (Ctrl-C: KeyboardInterrupt) keeps what it had checked.
    """
    from tqdm import tqdm

    unique = list(dict.fromkeys(paths))
    stats = ImageCheckStats(images=len(unique))
    store = ImageCheckCache(cache)
    results: dict[str, tuple[str | None, str]] = {}
    jobs, by_key = [], {}
    for path in unique:
        key = os.path.abspath(path)
        found = _stat(key)
        if found is None:
            results[key] = ("missing_image", f"image file not found: {path}")
            stats.missing += 1
        elif (known := store.lookup(key, *found)) is not None:
            results[key] = known
            stats.from_cache += 1
        elif key not in by_key:
            by_key[key] = path
            jobs.append((key, *found))
    bar = tqdm(total=len(jobs), desc="decoding images", unit="img", disable=not progress or not jobs,
               dynamic_ncols=True)
    running = _run_jobs(jobs, workers)
    try:
        for key, size, mtime_ns, reason, detail in running:
            store.add(key, size, mtime_ns, reason, detail)
            results[key] = (reason, detail)
            stats.decoded += 1
            bar.update(1)
    finally:
        running.close()  # stops the pool now, also on Ctrl-C
        bar.close()
        store.close()
    return {path: results[os.path.abspath(path)] for path in unique}, stats
