"""Training checkpoints: everything needed to resume bit-for-bit, written atomically, loaded strictly.

A checkpoint is one `torch.save`d dict, loadable with `torch.load(..., weights_only=True)`:

- `model`: the CODIS state_dict, which already holds the student, the momentum teacher, the queues and
  their pointer, the codebook and the temperature (they are parameters or buffers of the model);
- `optimizer`, `scheduler`, `scaler` (None when no fp16 grad scaler is used);
- `rng`: the python, numpy, torch and CUDA generator states of every rank (list indexed by rank), so
  a resumed run draws the same random numbers as an uninterrupted one;
- `step` (optimizer steps done), `epoch` and `step_in_epoch` (optimizer steps already done in that
  epoch, so the sampler skips the samples already seen), `world_size`;
- `config`: the run configuration as a plain dict; `format_version`.

Files are `checkpoint_<step:08d>.pt` in the run's output directory plus `checkpoint_final.pt` at the
end. Each is written to a temporary file in the same directory, then renamed with `os.replace`, which
is atomic on POSIX: a crash mid-write leaves the previous checkpoint intact, never a truncated one.

Every checkpoint carries a digest of its content: the CRC-32 of each record of the archive (the pickled
structure and every tensor storage), which torch.save computes as it writes (switched on here even where
torch was told not to). Every load checks all of them first (`codis_lib.model.weights_file`): a file
whose bytes changed after the write, or that cannot be read at all (truncated, empty, not a checkpoint,
holding pickled objects), raises CheckpointReadError in one line naming it and the newest intact earlier
checkpoint beside it. A failed write (a full disk, a read-only folder) raises CheckpointWriteError
naming the file and the free space, and leaves no temporary file behind.

The model's tensors are loaded by `codis_lib.model.loading.load_state_strict`, the strict load that every
weights path shares; this module keeps the files (save, find, read) and the rest of the training state.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from codis_lib.model.loading import CheckpointMismatchError, load_state_strict
from codis_lib.model.weights_file import WeightsFileError, read_weights

FORMAT_VERSION = 1
FINAL_CHECKPOINT_NAME = "checkpoint_final.pt"
_NUMBERED = re.compile(r"^checkpoint_(\d{8})\.pt$")


class CheckpointReadError(WeightsFileError):
    """A checkpoint file that cannot be used: damaged (digest), truncated, or not a checkpoint; the message names it."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (full disk, read-only folder); earlier checkpoints are intact."""


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Return the path of the numbered checkpoint written after optimizer step `step`."""
    return Path(output_dir) / f"checkpoint_{step:08d}.pt"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Return the numbered checkpoints in `output_dir`, oldest (lowest step) first."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NUMBERED.match(p.name)]
    return sorted(found, key=lambda p: int(_NUMBERED.match(p.name).group(1)))


def checkpoint_step(path: str | os.PathLike) -> int:
    """Return the optimizer step in a numbered checkpoint's name (checkpoint_00000076.pt -> 76)."""
    match = _NUMBERED.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a numbered checkpoint (checkpoint_<step>.pt)")
    return int(match.group(1))


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Return the numbered checkpoint with the highest step in `output_dir`, or None if there is none."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """Return `path` after writing `obj` to it via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle, _with_checksums():
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        raise CheckpointWriteError(_write_failure(path, error)) from error
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def _with_checksums():
    """Have torch.save write the CRC-32 of every record (the checkpoint's digest) even if it was switched off."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None or get():  # older torch always writes them
        yield
        return
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(False)


def _write_failure(path: Path, error: BaseException) -> str:
    """Return the one-line reason a checkpoint write failed, with the free space of its file system."""
    if isinstance(error, OSError) and error.errno not in (None, errno.ENOSPC):
        reason = error.strerror or str(error)
    else:
        reason = "the disk is full" if isinstance(error, OSError) else "the write failed (a full disk?)"
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return f"could not write checkpoint {path}: {reason} ({free}); the earlier checkpoints are intact"


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Return `target` after making it a hard link to `source` (a copy where links are unsupported), atomically."""
    source, target = Path(source), Path(target)
    if target.exists() and os.path.samefile(source, target):
        return target  # already linked (a finished run resumed): a rename onto the same file would keep the link
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int, *, ignore: Collection[Path] = ()) -> list[Path]:
    """Return the numbered checkpoints deleted so that only the newest `keep_last` remain (0 keeps all).

    `ignore`: checkpoints neither counted nor deleted, the ones a resumed run left behind it (newer than
    the one it resumed from, perhaps damaged): they never take the place of a checkpoint of this run.
    """
    if keep_last <= 0:
        return []
    ignored = {Path(p) for p in ignore}
    doomed = [p for p in list_checkpoints(output_dir) if p not in ignored][:-keep_last]
    for path in doomed:
        path.unlink()
    return doomed


def capture_rng_state() -> dict:
    """Return this process's python, numpy, torch (and CUDA) generator states as weights_only-safe values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Restore the generator states captured by `capture_rng_state`."""
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """Return `value` with lists turned back into tuples (random.setstate needs tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Return the checkpoint dict stored at `path` (weights_only loading), with a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        checkpoint = read_weights(path, "", map_location=map_location, noun="checkpoint archive")
    except WeightsFileError as error:
        raise CheckpointReadError(f"{path}: {error.reason}; {earlier_intact(path)}", error.reason) from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointMismatchError(f"{path} is not a CODIS training checkpoint (no 'model' entry)")
    return checkpoint


def readable_checkpoint(path: str | os.PathLike) -> bool:
    """Return whether `path` matches its digest and loads as a checkpoint dict with a 'model' entry (memory-mapped)."""
    try:
        checkpoint = read_weights(path, "", mmap=True, log=None)
    except (WeightsFileError, OSError):
        return False
    return isinstance(checkpoint, dict) and "model" in checkpoint


def newest_intact_before(path: Path) -> Path | None:
    """Return the newest readable (digest-verified) numbered checkpoint older than `path` in its folder, or None."""
    match = _NUMBERED.match(path.name)
    older = [p for p in list_checkpoints(path.parent)
             if p.resolve() != path.resolve() and (match is None or int(_NUMBERED.match(p.name).group(1))
                                                   < int(match.group(1)))]
    return next((candidate for candidate in reversed(older) if readable_checkpoint(candidate)), None)


def earlier_intact(path: Path) -> str:
    """Return a clause naming the newest readable numbered checkpoint older than `path` in its folder."""
    candidate = newest_intact_before(path)
    if candidate is None:
        return f"no intact earlier checkpoint in {path.parent}"
    return f"the latest intact earlier checkpoint is {candidate} (resume from it with --resume {candidate})"


def make_checkpoint(*, model: torch.nn.Module, optimizer, scheduler, scaler, step: int, epoch: int,
                    step_in_epoch: int, config: dict, rng_states: list[dict], world_size: int,
                    extra: dict | None = None) -> dict:
    """Return the checkpoint dict of the current training state (see the module docstring)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_states,
        "step": int(step),
        "epoch": int(epoch),
        "step_in_epoch": int(step_in_epoch),
        "world_size": int(world_size),
        "config": config,
        **(extra or {}),
    }


def restore_training_state(checkpoint: dict, *, model: torch.nn.Module, optimizer, scheduler, scaler,
                           rank: int, world_size: int, source: str = "checkpoint") -> None:
    """Restore model, optimizer, scheduler, scaler and this rank's RNG state from `checkpoint`.

    RNG states are restored only when the world size is unchanged (ranks map one to one); otherwise
    training continues correctly but not bit-for-bit, and we say so.
    """
    load_state_strict(model, checkpoint["model"], source)
    if optimizer is not None and checkpoint.get("optimizer") is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint.get("scheduler") is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint.get("rng") or []
    if len(rng_states) == world_size:
        restore_rng_state(rng_states[rank])
    else:
        print(f"[codis] {source} was written by {len(rng_states)} process(es), resuming with {world_size}: "
              "random generator states are not restored (training continues, not bit-identically).")
