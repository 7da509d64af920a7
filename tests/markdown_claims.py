"""The numbers a notebook's markdown quotes, checked against the metrics.json that the notebook wrote.

A measured number in a notebook's markdown is written in bold: `**15**`, `**90 %**`, `**0.76**`. The
notebook's test lists a `Claim` for each: a phrase that finds it in the markdown, the metric it quotes
and the tolerance it is quoted to. `check_claims` fails when a phrase is missing or ambiguous, when a
quoted number is further from its metric than the tolerance, or when a bold number is claimed by no
phrase (a number nobody checks). So editing the text, or a change in what the notebook computes,
fails the notebook's test.

A number that holds only at the reading size (`size="full"`) is a Claim with `sizes=("full",)`: at
size "ci" its phrase must still be there, its value is checked only against a full-size run, in one
of two ways:

    CODIS_NOTEBOOK_SIZE=full pytest tests/test_nb_NN_*.py        # execute the notebook at full size
    CODIS_NOTEBOOK_RUNS=notebooks/outputs pytest tests/test_nb_0*.py -k reading_size
                                                                  # read the runs already made, execute nothing

The second reads `<folder>/NN/metrics.json` of each notebook's own run (the layout the notebooks write
by default: `notebooks/outputs/NN`) and refuses a run whose `notebook_run.json` says another size.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

# **15**, **0.76**, **90 %**, **1,000**; the number is group 1
BOLD_NUMBER = r"\*\*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?: ?%)?\*\*"
OTHER_BOLD = r"\*\*-?[\d,]+(?:\.\d+)?(?: ?%)?\*\*"  # "<B>" in a phrase: a bold number another Claim checks
SIZE_VARIABLE = "CODIS_NOTEBOOK_SIZE"
RUNS_VARIABLE = "CODIS_NOTEBOOK_RUNS"  # a folder holding NN/metrics.json and NN/notebook_run.json of full-size runs
RUN_RECORD = "notebook_run.json"  # codis_lib.course.RUN_RECORD: the run's size, written by start_notebook


@dataclass(frozen=True)
class Claim:
    """One bold number of the markdown: where it is, which metric it quotes, to what tolerance."""

    phrase: str  # regular expression (no groups of its own), "<N>" where the bold number stands: r"uses <N> of";
    #              "<B>" for another bold number in the phrase (one that another Claim checks)
    metric: str  # key of metrics.json
    tolerance: float  # absolute: |quoted - metric| <= tolerance
    sizes: tuple[str, ...] = ("ci", "full")  # the sizes at which the number holds
    at_most: bool = False  # the number is a bound ("within the first 50 steps"): metric <= quoted + tolerance


def notebook_size() -> str:
    """Return the size the notebook tests run at: $CODIS_NOTEBOOK_SIZE, "ci" when unset."""
    size = os.environ.get(SIZE_VARIABLE, "ci")
    if size not in ("ci", "full"):
        raise ValueError(f"{SIZE_VARIABLE}={size!r}: expected 'ci' or 'full'")
    return size


def markdown_text(path: str | os.PathLike) -> str:
    """Return the markdown cells of a notebook joined, every run of whitespace made one space."""
    notebook = nbformat.read(Path(path), as_version=4)
    text = " ".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    return re.sub(r"\s+", " ", text)


def check_claims(path: str | os.PathLike, metrics: dict, claims: list[Claim], size: str) -> list[str]:
    """Assert every claim against `metrics` (those that hold at `size`); return one line per number checked."""
    text = markdown_text(path)
    covered, problems, checked = [], [], []
    for claim in claims:
        matches = list(re.finditer(claim.phrase.replace("<N>", BOLD_NUMBER).replace("<B>", OTHER_BOLD), text))
        if len(matches) != 1:
            problems.append(f"phrase {claim.phrase!r} found {len(matches)} times in the markdown (expected once)")
            continue
        match = matches[0]
        covered.append(match.span(1))
        if size not in claim.sizes:
            continue
        if claim.metric not in metrics:
            problems.append(f"metric {claim.metric!r} (quoted by {claim.phrase!r}) is not in metrics.json")
            continue
        quoted, measured = float(match.group(1).replace(",", "")), float(metrics[claim.metric])
        line = (f"{claim.metric}: quoted {quoted:g}{' (a bound)' if claim.at_most else ''}, measured {measured:.6g}, "
                f"tolerance {claim.tolerance:g}")
        checked.append(line)
        off = measured - quoted if claim.at_most else abs(quoted - measured)
        if off > claim.tolerance + 1e-12:
            problems.append(f"{Path(path).name} quotes {quoted:g} for {claim.metric}; {line}")
    for match in re.finditer(BOLD_NUMBER, text):
        if not any(start <= match.start(1) < end for start, end in covered):
            problems.append(f"bold number {match.group(0)!r} in ...{text[max(0, match.start() - 50):match.end()]!r} "
                            f"has no Claim in the test")
    assert not problems, "\n".join(problems)
    return checked


def full_run_metrics(notebook: str | os.PathLike, runs: str | os.PathLike) -> dict:
    """Return the metrics.json of notebook NN's run in `runs`/NN, asserting that its record says size "full"."""
    folder = Path(runs) / Path(notebook).name[:2]
    record_file, metrics_file = folder / RUN_RECORD, folder / "metrics.json"
    for path in (record_file, metrics_file):
        assert path.is_file(), f"{path}: missing; run {Path(notebook).name} at size 'full' with its output_dir there"
    size = json.loads(record_file.read_text()).get("size")
    assert size == "full", f"{record_file}: a size={size!r} run, not a reading-size one (size 'full')"
    return json.loads(metrics_file.read_text())


def check_full_run(notebook: str | os.PathLike, claims: list[Claim], quoted=None) -> dict:
    """Check every Claim that holds at size "full" against the notebook's run in $CODIS_NOTEBOOK_RUNS.

    Skips when the variable is unset. `quoted` turns the run's metrics into the dict the Claims name
    (the notebook's test passes the same function to check_claims). Returns the run's metrics, for the
    test's own reading-size assertions.
    """
    runs = os.environ.get(RUNS_VARIABLE)
    if not runs:
        pytest.skip(f"set {RUNS_VARIABLE} to the folder of the course's full-size runs (e.g. notebooks/outputs)")
    metrics = full_run_metrics(notebook, runs)
    checked = check_claims(notebook, quoted(metrics) if quoted else metrics, claims, "full")
    assert len(checked) == sum("full" in claim.sizes for claim in claims)
    return metrics
