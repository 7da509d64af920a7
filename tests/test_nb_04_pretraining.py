"""Notebook 04 pretrains tiny CODIS at CI size: every loss term falls, and the checkpoint reloads exactly."""
import pytest

from tests.nbharness import run_notebook

pytestmark = pytest.mark.slow  # executes a notebook with papermill (10-60 s)


def test_notebook_04_pretraining():
    metrics = run_notebook("04_pretraining")
    assert metrics["lr_hand_vs_library_max_abs"] < 1e-12 and metrics["alpha_hand_vs_library_max_abs"] < 1e-12
    assert metrics["steps"] == 80
    assert set(metrics["terms"]) == {"align", "code", "ot", "itm", "mlm"}
    for term in metrics["terms"] + ["total"]:
        assert metrics[f"{term}_last"] < metrics[f"{term}_first"], f"L_{term} did not decrease"
    # L_code starts near 2 ln K (two uniform predictions) and must have learnt something.
    assert metrics["code_last"] < metrics["code_first"] - 0.3
    assert 1.0 < metrics["perplexity_last"] <= metrics["codebook_size"]
    # the end of training evaluates both splits of pretrain_emoji, new drawings of training concepts first
    assert metrics["eval_splits"] == ["new_drawings", "test"]
    assert 0.0 <= metrics["zero_shot_r_mean"] <= 100.0 and metrics["eval_images"] > 0
    assert 0.0 <= metrics["new_drawings_r_mean"] <= 100.0 and metrics["new_drawings_images"] > 0
    assert 0.0 <= metrics["seen_r_mean"] <= 100.0
    assert metrics["checkpoint_reloaded_identical"] is True
