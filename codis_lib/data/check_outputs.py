"""Where `codis-check-data` may write: never over one of its inputs, and only where it can write, checked first.

Its outputs (the cleaned JSON, its report and manifest, the image-check cache) are compared with its
inputs (the annotation file and every image it names) after resolving links, so that neither ``--out``
nor ``--cache`` can destroy what is being checked; and each output folder is tried for writing
before any image is decoded, so that an unwritable ``--out`` fails at once, not after an hour of decoding.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["cache_location", "refuse_overwriting_inputs", "check_writable"]


def cache_location(cache: str | os.PathLike | bool | None, cleaned: Path, name: str) -> Path | None:
    """Return the cache file: ``name`` beside ``cleaned`` (True), inside a folder given as ``cache``, or ``cache``."""
    if cache is True:
        return cleaned.parent / name
    if not cache:
        return None
    return Path(cache) / name if Path(cache).is_dir() else Path(cache)


def refuse_overwriting_inputs(source: Path, outputs: Mapping[str, Path | None], images: Iterable[str]) -> None:
    """Raise a one-line ValueError if an output is the annotation file or one of its images (links followed).

    Images are compared by their real folder (one ``realpath`` per distinct folder, not per file).
    """
    real_folders: dict[str, str] = {}

    def real(path: str) -> str:
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in real_folders:
            real_folders[folder] = os.path.realpath(folder)
        return os.path.join(real_folders[folder], name)

    inputs = {os.path.realpath(source): f"the input {source}"}
    for image in images:
        inputs.setdefault(real(image), f"the image {image} of the input")
    for what, output in outputs.items():
        if output is not None and os.path.realpath(output) in inputs:
            raise ValueError(f"{what} {output}: this would overwrite {inputs[os.path.realpath(output)]}; "
                             f"the inputs are never modified")


def check_writable(outputs: Mapping[str, Path | None]) -> None:
    """Raise a one-line error unless every output can be written: not a folder, not read-only, its folder writable.

    Creates missing folders, and tries a temporary file in each (removed at once).
    """
    tried: set[Path] = set()
    for what, output in outputs.items():
        if output is None:
            continue
        if output.is_dir():
            raise ValueError(f"{what} {output}: is a folder; give a file path")
        if output.exists() and not os.access(output, os.W_OK):
            raise PermissionError(f"{what} {output}: is read-only; give another path or make it writable")
        folder = output.parent
        if folder in tried:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(dir=folder, prefix=".codis-check-write-")
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise PermissionError(f"{what} {output}: cannot write in {folder} ({error.strerror or error})") from None
        tried.add(folder)
