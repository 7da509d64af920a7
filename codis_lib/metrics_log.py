"""The training log: one JSON object per line (`metrics.jsonl`) and TensorBoard scalars, written and read back.

The JSON-lines file is the source of truth: plain text, appendable across resumed runs, readable
without TensorBoard (`read_jsonl`). Each training record has `step`, `epoch`, `lr`, `alpha`,
`loss` (weighted total), `loss/<term>` for every active term, `temperature`, `pairs_per_s` and the
codebook diagnostics (`codebook_perplexity`, `hard_code_perplexity`, `dead_codes`) when the model reports them. Evaluation
records carry `"kind": "eval"` and the `split` evaluated (TensorBoard: eval/<split>/<metric>). A training file
cleaned by `codis-check-data` adds one `"kind": "data_check"` record at the start (its manifest's path and
sha256, and whether the file still matches it). Only rank 0 writes (`MetricsLogger`, used by the
trainer); the loss-curve figures drawn from these records are `codis_lib.viz.plot_loss_curves` and
`plot_series`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

__all__ = ["LOSS_PREFIX", "MetricsLogger", "read_jsonl", "loss_terms"]

LOSS_PREFIX = "loss/"  # a loss term's key in a record: loss/<term>


class MetricsLogger:
    """Appends records to `<output_dir>/metrics.jsonl` and, optionally, to TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: TensorBoard is slow to import

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, record: dict, step: int) -> None:
        """Append `record` (numbers and strings) as one JSON line and its numbers as TensorBoard scalars."""
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            if record.get("split"):  # one evaluation record per split at the same step: eval/<split>/...
                prefix += f"{record['split']}/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str | os.PathLike, kind: str | None = "train") -> list[dict]:
    """Return the records of a metrics.jsonl file, keeping only `kind` ("train", "eval"; None = all).

    A resumed run appends after the records it already wrote; when steps repeat (a crash after the
    last checkpoint), the later record wins, so the returned list has increasing, unique steps.
    """
    records = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON object: {error}") from error
    if kind is not None:
        records = [r for r in records if r.get("kind", "train") == kind]
    if kind == "train":
        by_step = {}
        for record in records:
            by_step[record["step"]] = record
        records = [by_step[s] for s in sorted(by_step)]
    return records


def loss_terms(records: Sequence[dict]) -> list[str]:
    """Return the loss term names (without the `loss/` prefix) present in `records`, in first-seen order."""
    terms: list[str] = []
    for record in records:
        for key in record:
            if key.startswith(LOSS_PREFIX) and key[len(LOSS_PREFIX):] not in terms:
                terms.append(key[len(LOSS_PREFIX):])
    return terms
