"""Notebook 02 runs at CI size and learns a shared codebook that both views agree on."""
import pytest

from tests.nbharness import run_notebook

pytestmark = pytest.mark.slow  # executes a notebook with papermill (10-60 s)


def test_notebook_02_codebook_learning():
    metrics = run_notebook("02_codebook_learning")
    assert metrics["hand_vs_library_max_abs"] < 1e-6
    chance = 1 / metrics["n_codes"]
    assert metrics["agreement_start"] < 3 * chance + 0.1
    assert metrics["agreement_end"] > 0.5 and metrics["agreement_end"] > metrics["agreement_start"] + 0.3
    assert metrics["perplexity_end"] > max(metrics["perplexity_start"], 0.5 * metrics["n_codes"])
    assert metrics["purity_end"] > 0.8
