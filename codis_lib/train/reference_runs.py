"""Measuring reference loss curves (`codis_lib.train.reference`): seeded runs, the binned bands, the JSON file.

`tools/reference_curves.py` is the command line; the functions live here so that tests can build a
reference on the small corpus the same way. Kept apart from `reference` because they train (they import
the engine, which imports the check).
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from codis_lib.metrics_log import LOSS_PREFIX, read_jsonl
from codis_lib.run_config import RunConfig
from codis_lib.train.engine import train
from codis_lib.train.process import init_distributed
from codis_lib.train.reference import REFERENCE_VERSION, band, bin_records, normalise, reference_settings
from codis_lib.train.setup import build_training_run

__all__ = ["comparable_config", "curve_settings", "run_reference_seed", "build_curve", "write_reference"]


# ------------------------------------------------------------------------------------------ measuring
# Settings that do not change the loss values and that a reference run is free to set (or a reused run
# folder to have set differently); everything else of the run config must equal the curve's.
_FREE_TRAIN_KEYS = ("seed", "output_dir", "num_threads", "progress", "tensorboard", "overwrite", "eval",
                    "reference_curves", "device", "precision", "keep_last", "ckpt_every")
_FREE_DATA_KEYS = ("root", "build_if_missing", "num_workers", "cache_images")


def comparable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a run config dict without the settings a reference run may choose freely."""
    train = {k: v for k, v in config.get("train", {}).items() if k not in _FREE_TRAIN_KEYS}
    data = {k: v for k, v in config.get("data", {}).items() if k not in _FREE_DATA_KEYS}
    model = dict(config.get("model", {}))
    for section in ("vision", "text"):  # the tokenizer's ids replace the file's placeholders in a saved config
        model[section] = {k: v for k, v in dict(model.get(section, {})).items()
                          if not k.endswith(("_token_id", "vocab_size"))}
    return normalise({"model": model, "data": data, "train": train})


def curve_settings(config: RunConfig) -> dict[str, Any]:
    """Return `reference_settings` of a single-process run of `config`, building its data and model (no training)."""
    return reference_settings(build_training_run(config, init_distributed(config.train.device)))


def run_reference_seed(config: RunConfig, seed: int, *, steps: int, schedule: str, work_dir: str | os.PathLike,
                       reuse: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Return the training records of one reference run of `config` under `seed` (the first `steps` steps).

    schedule "max_steps": the run is `steps` long (train.max_steps, its own short schedule); "full": the
    config's whole schedule, stopped after `steps` (--stop-at-step), so its curve is the full run's start.
    With `reuse`, a run folder in work_dir/seed<N> that already reached `steps` with the same settings is read.
    """
    if schedule not in ("max_steps", "full"):
        raise ValueError(f"schedule must be 'max_steps' or 'full', got {schedule!r}")
    output = Path(work_dir) / f"seed{seed}"
    settings = {"train.seed": seed, "train.output_dir": str(output), "train.eval.at_end": False,
                "train.progress": False, "train.tensorboard": False, "train.reference_curves": None,
                "train.overwrite": True}
    if schedule == "max_steps":
        settings["train.max_steps"] = steps
    run_config = config.with_overrides(settings)
    if reuse and (output / "metrics.jsonl").is_file() and (output / "config.yaml").is_file():
        records = read_jsonl(output / "metrics.jsonl")
        saved = yaml.safe_load((output / "config.yaml").read_text())
        if (records and records[-1]["step"] >= steps and saved["train"]["seed"] == seed
                and comparable_config(saved) == comparable_config(run_config.to_dict())):
            log(f"[reference] seed {seed}: reusing {output} ({records[-1]['step']} steps)")
            return [r for r in records if r["step"] <= steps]
    log(f"[reference] seed {seed}: training {steps} steps ({schedule} schedule) into {output} ...")
    result = train(run_config, stop_at_step=steps if schedule == "full" else None)
    return [r for r in result.records if r["step"] <= steps]


def build_curve(name: str, settings: Mapping[str, Any], runs: Mapping[int, Sequence[Mapping[str, Any]]], *,
                bin_steps: int, k_std: float, rel: float, description: str = "") -> dict[str, Any]:
    """Return one reference curve: per bin of `bin_steps` steps and per term, the band over the seeds in `runs`.

    runs: {seed: training records}. A bin has the seeds whose records cover it (a longer single-seed run
    adds bins without a band).
    """
    terms = sorted({key for records in runs.values() for record in records
                    for key in record if key == "loss" or key.startswith(LOSS_PREFIX)})
    binned = {seed: bin_records(records, bin_steps, terms) for seed, records in runs.items()}
    ends = sorted({end for bins in binned.values() for end in bins})
    bins = []
    for end in ends:
        seeds = [seed for seed in sorted(binned) if end in binned[seed]]
        stats = {term: {key: round(value, 5) if isinstance(value, float) else value
                        for key, value in band([binned[s][end][term] for s in seeds], k_std=k_std, rel=rel).items()}
                 for term in terms if all(term in binned[s][end] for s in seeds)}
        bins.append({"end_step": end, "seeds": seeds, "terms": stats})
    return {"name": name, "description": description, "seeds": sorted(runs), "match": normalise(dict(settings)),
            "bins": bins}


def write_reference(path: str | os.PathLike, *, config: str, curve: Mapping[str, Any] | None, bin_steps: int,
                    k_std: float, rel: float, generated_by: str, status: str = "measured", note: str = "") -> dict:
    """Write (or update) a reference file: `curve` replaces the curve of the same name; return the contents."""
    path = Path(path)
    existing = json.loads(path.read_text()) if path.is_file() else {}
    if existing.get("bin_steps", bin_steps) != bin_steps or existing.get("band", {}).get("k_std", k_std) != k_std \
            or existing.get("band", {}).get("rel", rel) != rel:
        existing = {}  # other binning or band rule: the old curves are not comparable, start the file again
    curves = [c for c in existing.get("curves", []) if curve is None or c["name"] != curve["name"]]
    if curve is not None:
        curves.append(dict(curve, generated_by=generated_by,
                           measured_with=f"torch {torch.__version__}, {platform.machine()}, CPU, 1 thread"))
    data = {"version": REFERENCE_VERSION, "config": config, "status": status if curves or status != "measured"
            else "not yet measured", "note": note or existing.get("note", ""),
            "terms": "loss (the weighted total) and loss/<term>, as in metrics.jsonl",
            "bin_steps": bin_steps,
            "band": {"k_std": k_std, "rel": rel,
                     "rule": "lo, hi = min - margin, max + margin; margin = max(k_std * std, rel * |mean|) "
                             "over the seeds' bin means (std with n - 1); single-seed bins have no band"},
            "curves": curves}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data
