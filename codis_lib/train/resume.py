"""Where a run starts: its own latest checkpoint (`--resume`, checked first), `train.init_from`, or scratch.

A resume restores everything a checkpoint holds (weights, teacher, queues, optimizer, schedule, grad
scaler, RNG states, the position in the epoch), after two checks that refuse in one line: the model
config must be the one the checkpoint was trained with (`model_config_differences`) and so must the
data order (`codis_lib.train.data_order`). A fresh run claims its output folder first, then loads
`train.init_from` if set (`codis_lib.model.pretrained.init_from_checkpoint`).

Every checkpoint is read through its digest check (`codis_lib.checkpoint.load_checkpoint`): a damaged
one is refused in one line naming it and the newest intact earlier checkpoint to resume from instead.
The weights it brings (resume or init_from) must be finite, or one line names the file and the tensors.
A resumed run leaves the checkpoints newer than its start (`StartPosition.abandoned`) out of keep_last
pruning until it overwrites them, so they never take the place of an intact checkpoint of its own.
`--resume` wins over `train.overwrite=true`, and says so. Image files whose size or modification time
changed since the checkpoint get one warning line naming the first (`codis_lib.train.image_files`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from codis_lib.checkpoint import (CheckpointMismatchError, CheckpointReadError, checkpoint_step, earlier_intact,
                                  newest_intact_before,
                                  find_latest_checkpoint, list_checkpoints, load_checkpoint, restore_training_state)
from codis_lib.config import ModelConfig
from codis_lib.train.data_order import DATA_ORDER_KEY, check_resume_data_order
from codis_lib.train.image_files import image_change_warning, image_paths, save_image_stats
from codis_lib.train.guards import non_finite_names, state_tensors
from codis_lib.train.run_dir import claim_output_dir
from codis_lib.train.setup import TrainingRun

__all__ = ["StartPosition", "start_position", "model_config_differences"]


@dataclass
class StartPosition:
    """Where the loop starts: optimizer steps done, the epoch and the steps done in it, the last checkpoint."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    last_checkpoint: Path | None = None
    abandoned: tuple[Path, ...] = ()  # checkpoints newer than the one resumed from: not this run's, not pruned


def start_position(run: TrainingRun, resume: bool | str | os.PathLike) -> StartPosition:
    """Return the loop's starting position: from a checkpoint of this run, from train.init_from, or from scratch.

    A fresh run claims its output folder first (refusing, or with train.overwrite deleting, an earlier run's files).
    """
    tc, ctx, output_dir = run.config.train, run.ctx, run.output_dir
    resume_path = None
    if resume:
        resume_path = Path(resume) if not isinstance(resume, bool) else find_latest_checkpoint(output_dir)
        if resume_path is None:
            raise FileNotFoundError(f"--resume: no checkpoint_*.pt in {output_dir} to resume from; start the run "
                                    f"without --resume")
    if resume_path is None:
        claim_output_dir(output_dir, overwrite=tc.overwrite, ctx=ctx)
        if tc.init_from:
            from codis_lib.model.pretrained import init_from_checkpoint  # noqa: PLC0415 (the model package: lazily)

            init_from_checkpoint(run.model, tc.init_from)
            _refuse_non_finite(run, f"train.init_from: checkpoint file {tc.init_from}", "")
        _record_image_files(run)
        return StartPosition()
    if tc.overwrite and ctx.is_main:
        print("[codis] --resume wins over train.overwrite=true: resuming, nothing deleted", flush=True)
    resume_path, checkpoint = _load_resume_checkpoint(resume_path, latest=isinstance(resume, bool), ctx=ctx)
    check_resume_data_order(checkpoint, run.data_order, resume_path,
                            log=lambda line: print(line, flush=True) if ctx.is_main else None)
    _record_image_files(run, (checkpoint.get(DATA_ORDER_KEY) or {}).get("images"), resume_path)
    differences = model_config_differences(checkpoint["config"]["model"], run.model_config.to_dict())
    if differences:
        raise CheckpointMismatchError(f"{resume_path} was trained with another model config:\n  "
                                      + "\n  ".join(differences))
    restore_training_state(checkpoint, model=run.model, optimizer=run.optimizer, scheduler=run.schedule,
                           scaler=run.scaler, rank=ctx.rank, world_size=ctx.world_size, source=str(resume_path))
    _refuse_non_finite(run, str(resume_path), f"; {earlier_intact(resume_path)}")
    step = int(checkpoint["step"])
    own = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) <= step]
    start = StartPosition(step=step, epoch=checkpoint["epoch"], step_in_epoch=checkpoint["step_in_epoch"],
                          last_checkpoint=own[-1] if own else None,
                          abandoned=tuple(p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step))
    if ctx.is_main:
        print(f"[codis] resumed from {resume_path}: step {start.step}, epoch {start.epoch}, step "
              f"{start.step_in_epoch} of the epoch", flush=True)
    return start


def _record_image_files(run: TrainingRun, saved: dict | None = None, checkpoint: Path | None = None) -> None:
    """Warn in one line when the image files changed since `checkpoint`; then record them in the run folder (rank 0)."""
    if not run.ctx.is_main or run.image_stats is None:
        return
    if checkpoint is not None:
        line = image_change_warning(saved, run.image_stats, image_paths(run.data.dataset), run.output_dir, checkpoint)
        if line:
            print(line, file=sys.stderr, flush=True)
    save_image_stats(run.output_dir, run.image_stats)


def _load_resume_checkpoint(path: Path, *, latest: bool, ctx) -> tuple[Path, dict]:
    """Return (path, checkpoint) to resume from: `path`, or with a plain --resume the newest intact one before it.

    A damaged or truncated latest checkpoint (its digest or archive does not verify) is passed over with one
    warning line naming it and the checkpoint used instead; a file named with --resume PATH is refused.
    """
    try:
        return path, load_checkpoint(path, map_location=ctx.device)
    except CheckpointReadError as error:
        fallback = newest_intact_before(path) if latest else None
        if fallback is None:
            raise
        if ctx.is_main:
            print(f"[codis] WARNING: {' '.join(str(error).split())}; resuming from the newest intact checkpoint "
                  f"{fallback} instead", file=sys.stderr, flush=True)
        return fallback, load_checkpoint(fallback, map_location=ctx.device)


def _refuse_non_finite(run: TrainingRun, source: str, advice: str) -> None:
    """Raise CheckpointReadError naming `source` when the weights or optimizer state it gave hold a NaN or inf."""
    names, count = non_finite_names(state_tensors(run.model, run.optimizer))
    if count:
        shown = ", ".join(names) + (f" and {count - len(names)} more" if count > len(names) else "")
        reason = f"holds non-finite values (NaN or inf) in {count} tensor(s): {shown}; training cannot start from it"
        raise CheckpointReadError(f"{source}: {reason}{advice}", reason)


def model_config_differences(saved: dict, current: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Return the dotted keys whose values differ between two nested config dicts (a resume must match).

    A key the saved config lacks (a checkpoint written before that option existed) counts as its default
    value, `ModelConfig()`'s at the top level: the older code behaved as the default does.
    """
    if defaults is None and not prefix:
        defaults = ModelConfig().to_dict()
    defaults = defaults or {}
    keys = sorted(set(saved) | set(current))
    differences = []
    for key in keys:
        a, b = saved.get(key, defaults.get(key)), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            nested = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
            differences += model_config_differences(a, b, f"{prefix}{key}.", nested)
        elif a != b:
            differences.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return differences
