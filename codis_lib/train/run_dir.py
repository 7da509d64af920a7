"""The run folder (`train.output_dir`): claimed by a fresh run, filled with checkpoints, closed with a final link.

    runs/pretrain_emoji/
      .run.lock                held by the run's rank 0 while it runs (`codis_lib.train.lock`)
      config.yaml              the resolved run config
      tokenizer/               the tokenizer the run trained with (the folder is self-contained)
      checkpoint_00000076.pt   numbered checkpoints, the last `train.keep_last` kept
      checkpoint_final.pt      a hard link to (or copy of) the last one, once the run is finished
      metrics.jsonl            training and evaluation records (codis_lib.metrics_log)
      image_files.npy          size and modification time of each image, to name a changed one on resume
      eval_new_drawings.json   the retrieval evaluation at the end, one file per split of train.eval.splits
      eval_test.json
      tensorboard/

Only rank 0 writes; every function that touches the folder waits for the other ranks where they must agree.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path

import torch.distributed as dist

from codis_lib import distributed as cdist
from codis_lib.checkpoint import (FINAL_CHECKPOINT_NAME, capture_rng_state, checkpoint_path, find_latest_checkpoint,
                                  link_or_copy, make_checkpoint, prune_checkpoints, save_atomic)
from codis_lib.metrics_log import MetricsLogger
from codis_lib.run_config import RunConfig
from codis_lib.train.guards import check_state
from codis_lib.train.lock import RunFolderLockedError, RunLock, pid_alive
from codis_lib.train.process import RunContext
from codis_lib.typed_config import ConfigError

__all__ = ["RUN_FILES", "refuse_data_folder", "check_free_space", "lock_output_dir", "remove_stale_temporaries", "claim_output_dir", "write_run_files", "save_checkpoint", "link_final_checkpoint",
           "write_final_evaluations"]

# What makes a folder an earlier run's (a fresh run refuses it, or deletes these with train.overwrite); the
# run's image_files.npy is not among them: written first, it may be all that a run refused at start left.
RUN_FILES = ("checkpoint_*.pt", "metrics.jsonl", "eval_*.json", "config.yaml", "tokenizer")
_TEMPORARY = re.compile(r"^\.checkpoint_.*\.tmp-(\d+)$")  # save_atomic's and link_or_copy's temporary files


def lock_output_dir(ctx: RunContext, output_dir: Path) -> RunLock | None:
    """Return the run folder's lock, taken by rank 0 (None on the other ranks); every rank raises if it is refused.

    A live run in the folder raises RunFolderLockedError naming the folder and its pid; an unwritable
    place raises the OSError of creating the folder or the lock. Then rank 0 removes the temporary
    files that killed writes left (`remove_stale_temporaries`).
    """
    lock, failure = None, None
    if ctx.is_main:
        try:
            lock = RunLock(output_dir).acquire(log=lambda line: print(line, flush=True))
            remove_stale_temporaries(output_dir)
        except OSError as error:  # RunFolderLockedError is one
            failure = error
    if cdist.is_distributed() and ctx.world_size > 1:
        message = [None if failure is None else str(failure)]
        dist.broadcast_object_list(message, src=0)
        if failure is None and message[0] is not None:
            raise RunFolderLockedError(message[0], {})
    if failure is not None:
        raise failure
    return lock


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Return the `.checkpoint_*.tmp-PID` files of processes that are gone, after deleting them (rank 0, locked)."""
    removed = [path for path in output_dir.iterdir()
               if (match := _TEMPORARY.match(path.name)) and not pid_alive(int(match.group(1)))]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        print(f"[codis] removed {len(removed)} temporary file(s) of killed checkpoint writes in {output_dir}: "
              f"{', '.join(p.name for p in removed[:3])}{', ...' if len(removed) > 3 else ''}", flush=True)
    return removed


def refuse_data_folder(output_dir: Path, config: RunConfig) -> None:
    """Raise a one-line ConfigError when the run folder is a folder of the run's data (before anything is written).

    The data's folders: the emoji corpus (data.root), the folder of each training file, data.image_root.
    A run folder inside one of them is fine; the folder itself would mix checkpoints, config.yaml and
    tokenizer/ with the data's own (the emoji corpus has a tokenizer/ of its own).
    """
    data = config.data
    folders = [("data.root", data.root)] if data.dataset == "emoji" else []
    folders += [(f"the folder of data.train_files {name}", str(Path(name).parent)) for name in data.train_files]
    folders += [("data.image_root", data.image_root)] if data.image_root else []
    real = os.path.realpath(output_dir)
    for what, folder in folders:
        if os.path.realpath(folder) == real:
            raise ConfigError(f"train.output_dir {output_dir}: is {what}; the run's files (checkpoints, config.yaml, "
                              f"tokenizer/) would mix with the data's; pick another --output-dir")


def claim_output_dir(output_dir: Path, *, overwrite: bool, ctx: RunContext) -> None:
    """Make sure a fresh run does not mix with an earlier run's files in `output_dir` (deleted if `overwrite`)."""
    previous = sorted(p for pattern in RUN_FILES for p in output_dir.glob(pattern)) if output_dir.is_dir() else []
    if previous and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a run ({', '.join(p.name for p in previous[:4])}"
            f"{', ...' if len(previous) > 4 else ''}). Continue it with --resume (a finished run is just evaluated "
            f"again), start over with --set train.overwrite=true, or pick another --output-dir.")
    ctx.barrier()  # every rank has looked before rank 0 deletes anything
    if previous and ctx.is_main:
        print(f"[codis] train.overwrite: removing the previous run's files in {output_dir}", flush=True)
        for path in previous:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        shutil.rmtree(output_dir / "tensorboard", ignore_errors=True)
    ctx.barrier()


def check_free_space(output_dir: Path, model) -> None:
    """Raise a one-line OSError when the run folder's file system cannot hold one more checkpoint (at start).

    A checkpoint holds the model's state and AdamW's two moments of every trained parameter. Without this
    a nearly full disk failed at the first checkpoint, after training up to it, or in TensorBoard's
    writer thread (a traceback naming no file).
    """
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need, free = state + moments, shutil.disk_usage(output_dir).free
    if free < 1.05 * need + 2**20:
        raise OSError(f"{output_dir}: {free / 2**20:.1f} MiB free, but a checkpoint of this model needs about "
                      f"{need / 2**20:.0f} MiB; free some space there or pick another --output-dir")


def write_run_files(output_dir: Path, config: RunConfig, tokenizer) -> None:
    """Write config.yaml and the tokenizer into the run folder (rank 0 calls this), creating the folder.

    config.yaml records what the run uses: model.text.vocab_size and the special token ids are the
    tokenizer's (`ModelConfig.with_tokenizer`, as the model is built), not the config file's placeholders.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    used = dataclasses.replace(config, model=config.model.with_tokenizer(tokenizer))
    (output_dir / "config.yaml").write_text(used.to_yaml())
    tokenizer.save_pretrained(str(output_dir / "tokenizer"))  # the run folder is self-contained


def save_checkpoint(ctx: RunContext, output_dir: Path, *, model, optimizer, schedule, scaler, step: int, epoch: int,
                    step_in_epoch: int, saved_config: dict, keep_last: int, extra: dict | None = None,
                    ignore: Collection[Path] = ()) -> Path:
    """Write the checkpoint of `step` (rank 0; RNG states gathered from every rank) and return its path.

    `extra` entries are stored next to the state (the run's data-order record). Every rank first checks the
    model and optimizer state (identical on all ranks): a NaN/inf anywhere raises NonFiniteStateError and
    nothing is written. Then the oldest checkpoints beyond `keep_last` are deleted, leaving `ignore` (the
    checkpoints a resumed run left ahead of it) out of the count and in place.
    """
    path = checkpoint_path(output_dir, step)
    check_state(model, optimizer, step=step, epoch=epoch, what=f"{path.name} was not written",
                checkpoint=find_latest_checkpoint(output_dir))
    rng = capture_rng_state()
    if cdist.is_distributed() and ctx.world_size > 1:
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    if ctx.is_main:
        save_atomic(make_checkpoint(model=model, optimizer=optimizer, scheduler=schedule, scaler=scaler, step=step,
                                    epoch=epoch, step_in_epoch=step_in_epoch, config=saved_config,
                                    rng_states=gathered, world_size=ctx.world_size, extra=extra), path)
        prune_checkpoints(output_dir, keep_last, ignore=[p for p in ignore if p != path])
    ctx.barrier()
    return path


def link_final_checkpoint(ctx: RunContext, output_dir: Path, last_checkpoint: Path | None) -> Path | None:
    """Return checkpoint_final.pt after linking it to the last checkpoint (rank 0), or None if there was none."""
    final = last_checkpoint
    if ctx.is_main and last_checkpoint is not None:
        link_or_copy(last_checkpoint, output_dir / FINAL_CHECKPOINT_NAME)
        final = output_dir / FINAL_CHECKPOINT_NAME
    ctx.barrier()
    return final


def write_final_evaluations(output_dir: Path, evaluations: dict[str, dict], *, step: int, tensorboard: bool,
                            words: list | None = None) -> None:
    """Append the end-of-run evaluation of each split to metrics.jsonl (and TensorBoard) and write eval_<split>.json.

    `evaluations` is {split: retrieval report}, in the order of train.eval.splits; rank 0 calls this.
    `words`: the everyday-word benchmark's results (`WordQueryResult`), written to eval_words.json.
    """
    logger = MetricsLogger(output_dir, enabled=True, tensorboard=tensorboard)
    try:
        for split, evaluation in evaluations.items():
            logger.log({"kind": "eval", "step": step, "split": split, **evaluation["headline"]}, step)
            (output_dir / f"eval_{split}.json").write_text(json.dumps(evaluation, indent=2))
        for result in words or []:
            logger.log({"kind": "eval_words", "step": step, "split": result.gallery, "hit_at_k": result.hit_at_k,
                        "chance": result.chance, "k": result.k}, step)
        if words:
            (output_dir / "eval_words.json").write_text(json.dumps([w.to_dict() for w in words], indent=2))
    finally:
        logger.close()
