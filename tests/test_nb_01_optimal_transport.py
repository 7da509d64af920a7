"""Notebook 01 runs at CI size and its metrics show what the notebook teaches."""
import pytest

from tests.nbharness import run_notebook

pytestmark = pytest.mark.slow  # executes a notebook with papermill (10-60 s)


def test_notebook_01_optimal_transport():
    metrics = run_notebook("01_optimal_transport")
    distances = metrics["l1_to_exact_by_eps"]
    # Entropic plans approach the exact plan as eps shrinks.
    assert all(later < earlier for earlier, later in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.5 * distances[0]
    assert metrics["hand_vs_library_max_abs"] < 1e-10
    errors = metrics["marginal_error_eps0.05"]
    assert errors["iter3"] < 0.5 * errors["iter1"] and errors["last"] < 1e-6
    # Argmax collapses onto few codes; equal-partition OT uses (nearly) all of them.
    assert metrics["perplexity_sinkhorn"] > 0.9 * metrics["n_codes"]
    assert metrics["perplexity_argmax"] < 0.5 * metrics["perplexity_sinkhorn"]
    assert metrics["dead_codes_argmax"] > metrics["dead_codes_sinkhorn"]
    assert metrics["ot_cost_moved_codes"] < metrics["ot_cost_random_codes"]
