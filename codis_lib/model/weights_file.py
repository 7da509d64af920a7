"""Reading weights back from disk: one guarded reader for every file of tensors, its digest checked first.

Every file of weights the program loads goes through `read_weights`: training checkpoints (`--resume`,
`train.init_from`, codis-finetune's start, codis-eval), ALBEF's releases (`--albef-checkpoint`), DeiT and
BERT files (`model.vision.pretrained`, `model.text.pretrained`) and the packaged EfficientNet. It

1. checks the file's digest (`verify_digest`). A `torch.save` file is a zip archive with one record for
   the pickled structure (`data.pkl`: keys, shapes, dtypes, the config, steps, RNG states) and one per
   tensor storage, and every record carries the CRC-32 of its bytes, computed by torch.save as it
   writes (our checkpoints are always written with it, `codis_lib.checkpoint.save_atomic`). torch.load
   never checks them; we check all of them, so a byte of content that changed after the write (a bad
   disk, a broken copy) refuses the file, naming it and the record. The CRC detects every error burst up
   to 32 bits and misses a random change with odds of 2**-32 per record; it is a check against damage,
   not a signature: whoever can rewrite the file can rewrite its CRCs (no digest stored in a file can
   stop that; the weights-only load below is what keeps a hostile file from running code).
   Files without CRCs (torch's legacy format, or written with CRCs switched off) are loaded with a
   one-line warning that nothing could be verified;
2. loads it with `torch.load(weights_only=True)`, which builds tensors and plain values only; whatever
   torch or pickle raise for a bad file (truncated, empty, a pickled object, another kind of file) becomes
   one `WeightsFileError` line naming the file, never a traceback.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["WeightsFileError", "DigestMismatchError", "verify_digest", "read_weights"]

_CHUNK = 1 << 20


class WeightsFileError(ValueError):
    """A weights or checkpoint file that cannot be used; the one-line message names it and says why.

    `reason` is the message without the file's name.
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class DigestMismatchError(WeightsFileError):
    """A file whose content no longer matches the CRC-32 written with it: damaged after it was written."""


def _prefix(what: str, path: Path) -> str:
    return f"{what} {path}" if what else str(path)


def verify_digest(path: str | os.PathLike, what: str = "") -> str:
    """Return "verified" after checking the CRC-32 of every record of a torch archive, or why nothing was checked.

    "legacy": not a zip archive (torch's legacy format, or not torch at all: `read_weights` then says which);
    "no checksums": an archive written with CRCs switched off. A record whose bytes do not match its CRC
    raises DigestMismatchError naming the file and the record; an archive too damaged to list raises
    WeightsFileError.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return "legacy"
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(record.CRC for record in records if record.file_size):
                return "no checksums"
            for record in records:
                with archive.open(record) as stream:  # zipfile compares the CRC-32 when the record ends
                    while stream.read(_CHUNK):
                        pass
    except zipfile.BadZipFile as error:
        bad_crc = re.match(r"Bad CRC-32 for file '([^']*)'", str(error))
        if bad_crc:
            reason = (f"damaged: record '{bad_crc.group(1)}' does not match its CRC-32 (the digest written with it): "
                      "its bytes changed after it was written")
            raise DigestMismatchError(f"{_prefix(what, path)}: {reason}", reason) from None
        reason = f"a damaged archive ({error})"
        raise WeightsFileError(f"{_prefix(what, path)}: {reason}", reason) from None
    except (OSError, EOFError, ValueError) as error:  # a header pointing past the end, an unreadable file
        reason = f"a damaged archive ({type(error).__name__}: {error})"
        raise WeightsFileError(f"{_prefix(what, path)}: {reason}", reason) from None
    return "verified"


def _load_failure(path: Path, error: BaseException, noun: str) -> str:
    """Return why torch.load could not read `path`, in one line (no advice to unpickle arbitrary code)."""
    text = str(error)
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsupported:
        return (f"holds a pickled {unsupported.group(1)} object, refused: weights are read with weights_only=True, "
                "which builds tensors and plain values only and never runs code from the file")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if "weights only load failed" in first.lower():
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        first = detail.group(1).strip() if detail else "a value a weights-only load refuses"
    if zipfile.is_zipfile(path):
        return f"a damaged {noun} ({type(error).__name__}: {first})".replace(": )", ")")
    return f"not a {noun} (truncated, or another kind of file)"


def _warn(line: str) -> None:
    print(f"[codis] warning: {line}", file=sys.stderr, flush=True)


def read_weights(path: str | os.PathLike, what: str = "weights file", *, map_location: Any = "cpu",
                 verify: bool = True, mmap: bool = False, noun: str = "weights archive",
                 log: Callable[[str], None] | None = _warn) -> Any:
    """Return what `path` holds (torch.load, weights_only; a .safetensors file's tensors), its digest checked first.

    Every failure is one line naming the file, `what` first ("train.init_from: checkpoint file"):
    FileNotFoundError for a missing file or a folder, WeightsFileError for everything else (DigestMismatchError
    when the content changed after the write). verify=False skips the digest (a cheap look at the keys
    before the real load); mmap memory-maps an archive. `log` gets the one-line warning for a file
    without CRCs. `noun` names the kind of file in the reasons ("checkpoint archive").
    """
    path = Path(path)
    prefix = _prefix(what, path)
    if not path.is_file():
        raise FileNotFoundError(f"{prefix} {'is a directory' if path.is_dir() else 'does not exist'}")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{prefix}: an empty file (0 bytes)", "an empty file (0 bytes)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, prefix)
    status = verify_digest(path, what) if verify else "not asked"
    try:
        with warnings.catch_warnings():  # torch's remark on a raw pickle's protocol: the one line below says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            stored = torch.load(path, map_location=map_location, weights_only=True,
                                mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - torch.load and pickle raise many kinds for a bad file
        reason = _load_failure(path, error, noun)
        raise WeightsFileError(f"{prefix}: {reason}", reason) from error
    if status in ("legacy", "no checksums") and log is not None:
        why = "torch's legacy format" if status == "legacy" else "written with them switched off"
        log(f"{prefix} carries no CRC-32 checksums ({why}): loaded without verifying its content")
    return stored


def _read_safetensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Return the tensors of a .safetensors file (its header is checked by the format; it carries no digest)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, ...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = f"not a readable safetensors file ({first})"
        raise WeightsFileError(f"{prefix}: {reason}", reason) from error
