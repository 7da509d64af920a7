"""Notebook 01 runs at CI size, its metrics show what the notebook teaches and its markdown quotes them.

Sections 3-5 (marginal convergence, collapse, L_ot and the codebook updates) use the same 256 / 512
features and 64 codes at both sizes, so every number the markdown quotes is checked at size "ci", and
against a reading-size run already made by `test_reading_size_numbers` (CODIS_NOTEBOOK_RUNS=notebooks/outputs).
"""
import pytest

from tests.markdown_claims import Claim, check_claims, check_full_run, notebook_size
from tests.nbharness import notebook_job, notebook_path, run_notebook

pytestmark = pytest.mark.slow  # executes a notebook with papermill (10-60 s)

# Counts from float64 arithmetic are quoted exactly; those after 50 float32 Adam steps, to within 2.
CLAIMS = [
    Claim(r"the error is <N> after one iteration", "marginal_error_iter1", 0.0005),
    Claim(r"and <N> after three", "marginal_error_iter3", 0.00005),
    Claim(r"have cosine <N> on average", "cone_pair_cosine", 0.005),
    Claim(r"its top 3 codes take <N> of the samples", "top3_share_argmax_percent", 0.5),
    Claim(r"it uses <N> of the 64 codes", "codes_used_argmax", 0),
    Claim(r"\(<N> dead\)", "dead_codes_argmax", 0),
    Claim(r"its perplexity is <N>", "perplexity_argmax", 0.05),
    Claim(r"against <N> for a random throw", "random_throw_perplexity", 0.1),
    Claim(r"\(perplexity <N>\) and every code", "perplexity_sinkhorn", 0.05),
    Claim(r"\(<N> used, ", "codes_used_sinkhorn", 0),
    Claim(r"used, <N> dead\)", "dead_codes_sinkhorn", 0),
    Claim(r"is <N> on the cone", "l_ot_cone", 0.0005),
    Claim(r"argmax plan <N> codes get exactly zero gradient", "zero_gradient_codes_argmax", 0),
    Claim(r"Sinkhorn's plan <N> do", "zero_gradient_codes_sinkhorn", 0),
    Claim(r"still uses <N> codes", "codes_used_after_argmax", 2),
    Claim(r"\(perplexity <N>\): its", "perplexity_after_argmax", 1.0),
    Claim(r"its <N> dead codes received no gradient", "never_moved_argmax", 0),
    Claim(r"codebook uses <N> codes", "codes_used_after_Sinkhorn", 2),
    Claim(r"\(perplexity <N>\) by the same", "perplexity_after_Sinkhorn", 1.5),
    Claim(r"and <N> codes stayed where they started", "never_moved_Sinkhorn", 0),
]


def quoted(metrics: dict) -> dict:
    """01's metrics.json with the marginal errors the markdown quotes as flat keys."""
    errors = metrics["marginal_error_eps0.05"]
    return {**metrics, "marginal_error_iter1": errors["iter1"], "marginal_error_iter3": errors["iter3"]}


RUN = notebook_job(__name__, "test_notebook_01_optimal_transport",
                   lambda: run_notebook("01_optimal_transport", {"size": notebook_size()}))


def test_notebook_01_optimal_transport():
    size = notebook_size()
    metrics = RUN.result()
    distances = metrics["l1_to_exact_by_eps"]
    # Entropic plans approach the exact plan as eps shrinks.
    assert all(later < earlier for earlier, later in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.5 * distances[0]
    assert metrics["hand_vs_library_max_abs"] < 1e-10
    errors = metrics["marginal_error_eps0.05"]
    assert errors["iter3"] < 0.5 * errors["iter1"] and errors["last"] < 1e-6
    # Argmax collapses onto a few codes, far below a random throw; the equal-partition plan uses every code.
    n_codes = metrics["n_codes"]
    assert metrics["codes_used_argmax"] <= n_codes // 4 and metrics["top3_share_argmax_percent"] > 75
    assert metrics["perplexity_argmax"] < 0.2 * metrics["random_throw_perplexity"] < 0.2 * n_codes
    assert metrics["codes_used_sinkhorn"] == n_codes and metrics["perplexity_sinkhorn"] > 0.99 * n_codes
    # L_ot by hand is the library's; argmax's dead codes get no gradient and never move, Sinkhorn's all do.
    assert metrics["l_ot_hand_vs_library"] < 1e-5
    assert metrics["zero_gradient_codes_argmax"] == metrics["dead_codes_argmax"] == metrics["never_moved_argmax"]
    assert metrics["zero_gradient_codes_sinkhorn"] == 0 and metrics["never_moved_Sinkhorn"] == 0
    assert metrics["codes_used_after_argmax"] <= metrics["codes_used_argmax"]
    assert metrics["codes_used_after_Sinkhorn"] > 2 * metrics["codes_used_after_argmax"]
    assert metrics["perplexity_after_Sinkhorn"] > 2 * metrics["perplexity_after_argmax"]
    assert len(check_claims(notebook_path("01_optimal_transport"), quoted(metrics), CLAIMS, size)) == len(CLAIMS)


def test_reading_size_numbers():
    check_full_run(notebook_path("01_optimal_transport"), CLAIMS, quoted)  # skipped unless $CODIS_NOTEBOOK_RUNS
