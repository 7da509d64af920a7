"""What every numbered notebook does around its lesson: set-up at a size, the main model, the metrics file.

A notebook's first code cell is its `parameters` cell (papermill overrides `size`, `output_dir`,
`figure_dir`); the set-up cell after it reads

    >>> notebook = start_notebook(size, output_dir, figure_dir, seed=seed, num_threads=num_threads)
    >>> output_dir, figure_dir = notebook.output_dir, notebook.figure_dir

and the last cell `write_metrics(metrics, output_dir)`: the `metrics.json` that the notebook's test
(tests/test_nb_NN_*.py) asserts on. Notebooks 05 and 06 score the main command's model:

    >>> source = main_model_source(size, output_dir, checkpoint=checkpoint, fallback_checkpoint=...,
    ...                            data_root=data_root, fallback_steps=fallback_steps)
    >>> trained = load_main_model(source, device=device, num_threads=num_threads)

`codis-pretrain`'s checkpoint when it exists, else notebook 04's, else a short pretraining with the same
recipe (`load_or_train`); at size "ci" a 40-step model on a ~120-emoji corpus in the output folder.
Figures go through `codis_lib.viz.save_figure` (notebooks 04-06).

A notebook writes only under its `output_dir` (`notebooks/outputs/NN`, ignored by git) and its
`figure_dir` (None: `<output_dir>/figures`): running the course never changes a tracked file. The
figures the README and docs show live in docs/figures/, written only by `python tools/regenerate_figures.py`
from a reading-size run, which it recognises by the `notebook_run.json` that start_notebook leaves in
the output folder (RUN_RECORD).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from codis_lib.evaluation.models import TrainedModel
from codis_lib.train.load_or_train import load_or_train
from codis_lib.model.trunk_store import TRUNK_CACHE_ENV

__all__ = ["SIZES", "RUN_RECORD", "CI_MODEL_SETTINGS", "CI_MODEL_STEPS", "NotebookRun", "start_notebook", "MainModelSource",
           "main_model_source", "load_main_model", "write_metrics"]

SIZES = ("full", "ci")  # "full": the reading run behind the figures; "ci": the quick run the tests execute
# The CI-size model of notebooks 05-06: the main recipe on a ~120-emoji corpus at 32 px, 40 steps.
CI_MODEL_SETTINGS = {"data.emoji_limit": 120, "data.emoji_image_size": 32, "model.vision.image_size": 32,
                     "train.batch_size": 16, "model.queue_size": 64}
CI_MODEL_STEPS = 40
RUN_RECORD = "notebook_run.json"  # in the output folder: the run's size and figure folder (tools/regenerate_figures.py)


@dataclass(frozen=True)
class NotebookRun:
    """One execution of a notebook: its size, its folders and when it started."""

    size: str
    output_dir: Path  # metrics.json and anything else the notebook writes
    figure_dir: Path  # PNG figures
    started: float  # time.perf_counter() at set-up

    def seconds(self) -> float:
        """Return the wall time since set-up, in seconds."""
        return time.perf_counter() - self.started


def start_notebook(size: str, output_dir: str | os.PathLike, figure_dir: str | os.PathLike | None = None, *,
                   seed: int | None = None, num_threads: int | None = None,
                   share_trunk_maps: bool = False) -> NotebookRun:
    """Return the run's folders (both created) after setting torch's threads and seed, each when given.

    `share_trunk_maps=True` keeps the frozen ImageNet trunk's feature maps on disk in
    `<output_dir>/../trunk_cache` (sets $CODIS_TRUNK_CACHE_DIR unless it is set already;
    codis_lib.model.trunk_store), so that notebooks 04-06 compute each image's map once between them.

    `figure_dir` None means `<output_dir>/figures`. `num_threads` goes to `torch.set_num_threads`,
    `seed` to `torch.manual_seed`, in that order; None leaves torch's setting as it is (a notebook whose
    draws use their own generators passes no seed). Writes `<output_dir>/notebook_run.json` (RUN_RECORD):
    the size, the figure folder, the start time and the git commit, which tools/regenerate_figures.py reads.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(map(repr, SIZES))}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if seed is not None:
        torch.manual_seed(seed)
    output_dir = Path(output_dir)
    if share_trunk_maps:
        os.environ.setdefault(TRUNK_CACHE_ENV, str((output_dir.parent / "trunk_cache").resolve()))
    figure_dir = output_dir / "figures" if figure_dir is None else Path(figure_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figure_dir.mkdir(parents=True, exist_ok=True)
    record = {"size": size, "figure_dir": str(figure_dir.resolve()),
              "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **_source_version()}
    (output_dir / RUN_RECORD).write_text(json.dumps(record, indent=2))
    return NotebookRun(size, output_dir, figure_dir, time.perf_counter())


def _source_version() -> dict[str, Any]:
    """Return the git commit of this package's checkout and whether tracked files differ from it ({} outside git)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "uncommitted_changes": bool(changed)}


@dataclass(frozen=True)
class MainModelSource:
    """Where a notebook's model comes from, and how to make one when no checkpoint exists yet."""

    checkpoint: str  # the main command's checkpoint (codis-pretrain), scored when it exists
    fallback_checkpoint: str  # else this one; pretrained here first when it is missing too
    data_root: str  # the emoji corpus the fallback pretraining reads (built if missing)
    fallback_steps: int  # optimizer steps of that pretraining
    fallback_settings: Mapping[str, Any] = field(default_factory=dict)  # its config overrides beyond data.root


def main_model_source(size: str, output_dir: str | os.PathLike, *, checkpoint: str, fallback_checkpoint: str,
                      data_root: str, fallback_steps: int) -> MainModelSource:
    """Return the notebook's model source: the given one at size "full"; at "ci" a small model of its own.

    At "ci" both checkpoints become `<output_dir>/pretrain_ci/checkpoint_final.pt` and the corpus
    `<output_dir>/emoji_ci`, so that a fresh folder pretrains a CI_MODEL_STEPS-step model with
    CI_MODEL_SETTINGS, whatever checkpoints exist elsewhere.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(map(repr, SIZES))}")
    if size == "ci":
        small = str(Path(output_dir) / "pretrain_ci" / "checkpoint_final.pt")
        return MainModelSource(small, small, str(Path(output_dir) / "emoji_ci"), CI_MODEL_STEPS,
                               dict(CI_MODEL_SETTINGS))
    return MainModelSource(str(checkpoint), str(fallback_checkpoint), str(data_root), fallback_steps)


def load_main_model(source: MainModelSource, *, device: str | torch.device = "cpu",
                    num_threads: int | None = None) -> TrainedModel:
    """Return the model at `source.checkpoint`, else at the fallback, pretraining the fallback first if missing.

    Prints which checkpoint it scores, its step count, and whether it was trained just now.
    """
    to_score = source.checkpoint if Path(source.checkpoint).is_file() else source.fallback_checkpoint
    if to_score != source.checkpoint:
        print(f"{source.checkpoint} not found (codis-pretrain writes it): falling back to {to_score}")
    overrides = {"data.root": source.data_root, "train.device": device, "train.num_threads": num_threads,
                 **source.fallback_settings}
    trained = load_or_train(to_score, overrides=overrides, fallback_steps=source.fallback_steps, device=device)
    print(f"scored checkpoint: {trained.checkpoint} ({trained.model_config.mode} model, {trained.step} steps"
          + (", pretrained just now)" if trained.trained_now else ")"))
    return trained


def _not_json(value: Any, where: str) -> str | None:
    """Return the path of the first value under `where` that json cannot write, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _not_json(item, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        return next((found for i, item in enumerate(value) if (found := _not_json(item, f"{where}[{i}]"))), None)
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return f"{where} ({type(value).__name__})"


def write_metrics(metrics: Mapping[str, Any], output_dir: str | os.PathLike, *, hide: Sequence[str] = ()) -> None:
    """Write `metrics` to `<output_dir>/metrics.json` (indent 2) and print it, less the keys in `hide`.

    A value json cannot write (a tensor, a Path, a numpy integer) is a TypeError naming its key.
    """
    try:
        text = json.dumps(metrics, indent=2)
    except TypeError as error:
        raise TypeError(f"{_not_json(dict(metrics), 'metrics') or error} is not JSON; "
                        f"convert it with float(), int(), str() or .tolist()") from None
    (Path(output_dir) / "metrics.json").write_text(text)
    print(json.dumps({key: value for key, value in metrics.items() if key not in hide}, indent=2))
