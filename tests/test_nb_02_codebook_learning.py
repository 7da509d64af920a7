"""Notebook 02 runs at CI size, learns a shared codebook that both views agree on, and its markdown quotes it.

The step-0 numbers the markdown quotes are the same at both sizes and are checked at size "ci". The
end-of-training numbers are the reading size's (1,000 steps; CI runs 400): at "ci" only their phrases
are checked; their values against a reading-size run already made with `CODIS_NOTEBOOK_RUNS=notebooks/outputs
pytest tests/test_nb_02_codebook_learning.py -k reading_size`, or by executing one with CODIS_NOTEBOOK_SIZE=full.
"""
import pytest

from tests.markdown_claims import Claim, check_claims, check_full_run, notebook_size
from tests.nbharness import notebook_job, notebook_path, run_notebook

pytestmark = pytest.mark.slow  # executes a notebook with papermill (10-60 s)

FULL = ("full",)
CLAIMS = [
    Claim(r"the same code for <N> of the pairs", "agreement_start_percent", 0.5),
    Claim(r"view A's perplexity is <N>", "perplexity_start", 0.05),
    Claim(r"Purity starts at <N>", "purity_start", 0.001),
    Claim(r"agreement ends at <N>", "agreement_end_percent", 2.0, sizes=FULL),
    Claim(r"perplexity at <N> of 16", "perplexity_end", 0.5, sizes=FULL),
    Claim(r"purity at <N>", "purity_end", 0.02, sizes=FULL),
]


def quoted(metrics: dict) -> dict:
    """02's metrics.json with the agreements the markdown quotes, in %."""
    return {**metrics, "agreement_start_percent": 100 * metrics["agreement_start"],
            "agreement_end_percent": 100 * metrics["agreement_end"]}


RUN = notebook_job(__name__, "test_notebook_02_codebook_learning",
                   lambda: run_notebook("02_codebook_learning", {"size": notebook_size()}))


def test_notebook_02_codebook_learning():
    size = notebook_size()
    metrics = RUN.result()
    assert metrics["hand_vs_library_max_abs"] < 1e-6
    chance = 1 / metrics["n_codes"]
    assert metrics["agreement_start"] < 3 * chance + 0.1
    assert metrics["agreement_end"] > 0.5 and metrics["agreement_end"] > metrics["agreement_start"] + 0.3
    assert metrics["perplexity_end"] > max(metrics["perplexity_start"], 0.5 * metrics["n_codes"])
    assert metrics["purity_end"] > 0.8
    checked = check_claims(notebook_path("02_codebook_learning"), quoted(metrics), CLAIMS, size)
    assert len(checked) == sum(size in claim.sizes for claim in CLAIMS)


def test_reading_size_numbers():
    check_full_run(notebook_path("02_codebook_learning"), CLAIMS, quoted)  # skipped unless $CODIS_NOTEBOOK_RUNS
