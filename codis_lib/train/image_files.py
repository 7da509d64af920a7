"""Did the image files change under a resumed run? Their sizes and modification times, recorded and compared.

The data-order record (`codis_lib.train.data_order`) refuses a resume whose annotation files changed,
by their sha256; hashing every image the same way would read the whole corpus at every start. Images
are compared cheaply instead: one `os.stat` per distinct image file (in the dataset's order), whose
(size, mtime_ns) pairs make

- a digest, stored in every checkpoint's data-order record (`"images": {"count", "digest"}`);
- `image_files.npy` in the run folder, the pairs themselves, rewritten at each start of the run (rank 0),
  so that a resume can name the files that changed, not only say that some did.

A resume whose images differ from the checkpoint's record goes on, after one warning line naming the first
changed file and how many changed: replacing images may be deliberate (a re-rendered corpus), and a copy of
the corpus that kept the content but not the times (`cp` without `-p`) changes every time. Costs: a stat per
image at start (the readers already stat each one), 16 bytes per image in the run folder.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_FILES_NAME", "image_paths", "image_file_stats", "images_record", "save_image_stats",
           "image_change_warning"]

IMAGE_FILES_NAME = "image_files.npy"


def image_paths(dataset) -> list[str]:
    """Return the distinct image paths of a training dataset's records, in record order."""
    return list(dict.fromkeys(record.image for record in dataset.records))


def image_file_stats(paths: list[str]) -> np.ndarray:
    """Return an (n, 2) int64 array of (size, mtime_ns) per path; (-1, -1) where there is no file."""
    stats = np.full((len(paths), 2), -1, dtype=np.int64)
    for index, path in enumerate(paths):
        try:
            info = os.stat(path)
        except OSError:
            continue
        stats[index] = (info.st_size, info.st_mtime_ns)
    return stats


def images_record(stats: np.ndarray) -> dict:
    """Return {"count", "digest"} of the image stats, the part of the data-order record checkpoints store."""
    return {"count": int(len(stats)), "digest": hashlib.sha256(np.ascontiguousarray(stats).tobytes()).hexdigest()}


def save_image_stats(output_dir: Path, stats: np.ndarray) -> None:
    """Write `image_files.npy` into the run folder atomically (rank 0, at each start of the run)."""
    temporary = output_dir / f".{IMAGE_FILES_NAME}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            np.save(handle, stats)
        os.replace(temporary, output_dir / IMAGE_FILES_NAME)
    except OSError as error:
        raise OSError(f"cannot write {output_dir / IMAGE_FILES_NAME}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)


def image_change_warning(saved: dict | None, stats: np.ndarray, paths: list[str], output_dir: Path,
                         checkpoint: Path) -> str | None:
    """Return the warning line when the images differ from the checkpoint's record `saved`, else None.

    None too for a checkpoint without the record (written before it existed).
    """
    if not saved or images_record(stats) == saved:
        return None
    try:
        before = np.load(output_dir / IMAGE_FILES_NAME, allow_pickle=False)
    except (OSError, ValueError):
        before = None
    if before is None or before.shape != stats.shape or images_record(before) != saved:
        which = (f"{saved['count']} -> {len(stats)} images" if saved["count"] != len(stats) else
                 f"which ones is not known: {output_dir / IMAGE_FILES_NAME} is not the record of that checkpoint")
        return (f"[codis] WARNING: the image files changed since {checkpoint} was written (sizes or modification "
                f"times; {which}); resuming with the files as they are now")
    changed = np.flatnonzero((before != stats).any(axis=1))
    return (f"[codis] WARNING: {len(changed)} of {len(stats)} image files changed since {checkpoint} was written "
            f"(size or modification time), first {paths[changed[0]]}; resuming with the files as they are now "
            f"(the steps before it trained on the old ones)")
