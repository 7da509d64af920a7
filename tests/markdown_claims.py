"""The numbers a notebook's markdown quotes, checked against the metrics.json that the notebook wrote.

A measured number in a notebook's markdown is written in bold: `**15**`, `**90 %**`, `**0.76**`. The
notebook's test lists a `Claim` for each: a phrase that finds it in the markdown, the metric it quotes
and the tolerance it is quoted to. `check_claims` fails when a phrase is missing or ambiguous, when a
quoted number is further from its metric than the tolerance, or when a bold number is claimed by no
phrase (a number nobody checks). So editing the text, or a change in what the notebook computes,
fails the notebook's test.

A number that holds only at the reading size (`size="full"`) is a Claim with `sizes=("full",)`: at
size "ci" its phrase must still be there, its value is checked only in a full-size run
(`CODIS_NOTEBOOK_SIZE=full pytest tests/test_nb_NN_*.py`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

BOLD_NUMBER = r"\*\*(-?\d+(?:\.\d+)?)(?: ?%)?\*\*"  # **15**, **0.76**, **90 %**; the number is group 1
SIZE_VARIABLE = "CODIS_NOTEBOOK_SIZE"


@dataclass(frozen=True)
class Claim:
    """One bold number of the markdown: where it is, which metric it quotes, to what tolerance."""

    phrase: str  # regular expression (no groups of its own), "<N>" where the bold number stands: r"uses <N> of"
    metric: str  # key of metrics.json
    tolerance: float  # absolute: |quoted - metric| <= tolerance
    sizes: tuple[str, ...] = ("ci", "full")  # the sizes at which the number holds


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
        matches = list(re.finditer(claim.phrase.replace("<N>", BOLD_NUMBER), text))
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
        quoted, measured = float(match.group(1)), float(metrics[claim.metric])
        line = f"{claim.metric}: quoted {quoted:g}, measured {measured:.6g}, tolerance {claim.tolerance:g}"
        checked.append(line)
        if abs(quoted - measured) > claim.tolerance:
            problems.append(f"{Path(path).name} quotes {quoted:g} for {claim.metric}; {line}")
    for match in re.finditer(BOLD_NUMBER, text):
        if not any(start <= match.start(1) < end for start, end in covered):
            problems.append(f"bold number {match.group(0)!r} in ...{text[max(0, match.start() - 50):match.end()]!r} "
                            f"has no Claim in the test")
    assert not problems, "\n".join(problems)
    return checked
