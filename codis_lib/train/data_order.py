"""What a run's data order and schedule depend on, recorded in every checkpoint and checked by `--resume`.

A resumed run skips the batches of the epoch it already trained on by counting them: `step_in_epoch`
optimizer steps of `global batch x grad_accum_steps` samples, cut from the permutation that the seed
draws over the dataset's records. Change any of these and the count points somewhere else: a larger
batch skips samples never trained on, another seed or another dataset reshuffles everything, another
schedule length or learning rate bends the curve mid-run. So each checkpoint stores

    {"global_batch": 16, "grad_accum_steps": 1, "seed": 42, "task": "pretrain", "records": 4872,
     "train_files": [{"name": "pretrain.json", "path": "/.../pretrain.json", "bytes": 123, "sha256": "..."}],
     "schedule": {"total_steps": 9120, "warmup_steps": 912, "lr": 1e-4, "warmup_lr": 1e-5, "min_lr": 1e-5}}

(and the digest of the image files' sizes and modification times, `codis_lib.train.image_files`, which a
resume only warns about) and a resume whose values differ is refused in one line that names each changed value (old -> new)
and how to start a new run from these weights instead (`train.init_from`). The number of processes
is free to change (the global batch is what counts; see docs/BATCH.md), and so is the path of a data
file whose content is unchanged (a moved corpus). Checkpoints written before this record resume with
one warning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from codis_lib.typed_config import ConfigError

__all__ = ["DATA_ORDER_KEY", "data_order_record", "data_order_changes", "check_resume_data_order"]

DATA_ORDER_KEY = "data_order"
_LABELS = {"global_batch": "global batch (train.batch_size x processes)", "grad_accum_steps": "train.grad_accum_steps",
           "seed": "train.seed", "task": "train.task", "records": "training records",
           "style_variants": "data.style_variants"}


def _file_identity(path: str) -> dict[str, Any]:
    """Return name, resolved path, size and SHA-256 of one training file (the content the order is drawn over)."""
    from codis_lib.data.check import file_sha256  # noqa: PLC0415

    resolved = Path(path).resolve()
    return {"name": resolved.name, "path": str(resolved), "bytes": resolved.stat().st_size,
            "sha256": file_sha256(resolved)}


def data_order_record(run) -> dict[str, Any]:
    """Return the data-order record of a `TrainingRun` (see the module docstring), for its checkpoints.

    Measures the image files as it goes (`run.image_stats`; `codis_lib.train.image_files`): their digest is
    recorded too, but only warned about on resume, not refused.
    """
    from codis_lib.train.image_files import image_file_stats, image_paths, images_record  # noqa: PLC0415

    tc, schedule = run.config.train, run.schedule
    run.image_stats = image_file_stats(image_paths(run.data.dataset))
    # Style variants are recorded only when there are some: checkpoints of other runs keep their exact record.
    styles = {"style_variants": list(run.config.data.style_variants)} if run.config.data.style_variants else {}
    return {**styles, "images": images_record(run.image_stats),"global_batch": tc.batch_size * run.ctx.world_size, "grad_accum_steps": tc.grad_accum_steps,
            "seed": tc.seed, "task": tc.task, "records": len(run.data.dataset),
            "train_files": [_file_identity(path) for path in run.data.files],
            "schedule": {"total_steps": schedule.total_steps, "warmup_steps": schedule.warmup_steps,
                         "lr": schedule.lr, "warmup_lr": schedule.warmup_lr, "min_lr": schedule.min_lr}}


def data_order_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Return one "what: old -> new" item per value that differs between two data-order records."""
    changes = [f"{label} {saved.get(key)!r} -> {current.get(key)!r}" for key, label in _LABELS.items()
               if key in saved and saved.get(key) != current.get(key)]
    old_files, new_files = saved.get("train_files"), current.get("train_files")
    if old_files is not None and [(f["bytes"], f["sha256"]) for f in old_files] != \
            [(f["bytes"], f["sha256"]) for f in new_files]:
        changes.append(f"training files {_describe(old_files)} -> {_describe(new_files)}")
    for key, value in (saved.get("schedule") or {}).items():
        now = (current.get("schedule") or {}).get(key)
        if value != now:
            changes.append(f"schedule {key} {value!r} -> {now!r}")
    return changes


def _describe(files: list[dict]) -> str:
    return "[" + ", ".join(f"{f['path']} ({f['bytes']} bytes, sha256 {f['sha256'][:12]})" for f in files) + "]"


def check_resume_data_order(checkpoint: dict, current: dict[str, Any], path: Path, *, log=print) -> None:
    """Raise ConfigError (one line) when the checkpoint at `path` was trained with another data order or schedule.

    A checkpoint without the record (written before it existed) is resumed after one warning through `log`.
    """
    saved = checkpoint.get(DATA_ORDER_KEY)
    if saved is None:
        log(f"[codis] {path} does not record its data order (an older checkpoint): resuming without checking "
            f"that batch size, accumulation, seed, training data and schedule are unchanged")
        return
    changes = data_order_changes(saved, current)
    if changes:
        raise ConfigError(
            f"--resume: {path} was trained with another data order or schedule: {'; '.join(changes)}. Resume "
            f"with the values it was trained with, or start a new run from these weights: --set "
            f"train.init_from={path} and a new --output-dir")
