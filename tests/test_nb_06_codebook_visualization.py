"""Notebook 06 assigns codes by hand and with CODIS.assign_codes, and draws usage, UMAP and the code gallery."""
import pytest

from tests.nbharness import run_notebook

pytestmark = pytest.mark.slow  # executes a notebook with papermill (10-60 s)


def test_notebook_06_codebook_visualization():
    metrics = run_notebook("06_codebook_visualization")
    assert metrics["trained_now"] is True
    assert metrics["hand_vs_library_max_abs"] < 1e-5
    K = metrics["num_codes"]
    for key in ("image_perplexity", "text_perplexity", "ot_image_perplexity"):
        assert 1.0 <= metrics[key] <= K + 1e-6, key
    # Sinkhorn's equal-partition constraint spreads the split over more codes than the softmax arg-max does
    assert metrics["ot_image_perplexity"] >= metrics["image_perplexity"] - 1e-6
    assert 1 <= metrics["image_active_codes"] <= min(K, metrics["num_images"])
    assert 0.0 <= metrics["same_code_chance"] <= 1.0 and 0.0 <= metrics["same_code_rate"] <= 1.0
    assert 0.0 < metrics["soft_overlap_mismatched"] < 1.0 and 0.0 < metrics["soft_overlap_matched"] < 1.0
    assert 1 <= len(metrics["codes_shown"]) <= 4 and len(set(metrics["codes_shown"])) == len(metrics["codes_shown"])
    assert metrics["figures"] == ["06_code_gallery.png", "06_code_usage.png", "06_umap.png"]
