"""Notebook 07 at CI size, run twice into one folder: stopped in the kernel after step 2, then resumed by torchrun.

The first run trains in process (`launcher="inprocess"`) and stops with a checkpoint after step 2, as an
interrupt would; the second, with the CI size's own choice (2 torchrun processes over gloo), must continue
from that checkpoint, finish step 4, evaluate every split with chance beside recall, and agree with a
single-process evaluation. Then the ALBEF checks.
"""
import json
from pathlib import Path

import nbformat
import pytest
import torch

from tests.nbharness import notebook_job, notebook_work_dir, run_notebook
from codis_lib.data.emoji_new_style import noto_font_path

MAIN_SPLITS = (["new_drawings", "new_style", "test"] if noto_font_path() is not None  # pretrain_emoji's splits,
               else ["new_drawings", "test"])  # less the held-out style where the Noto font is missing

pytestmark = pytest.mark.slow  # executes a notebook with papermill twice (30-90 s)


def _outputs(executed: str) -> int:
    """Return how many outputs the executed notebook holds, all cells together."""
    return sum(len(cell.get("outputs", [])) for cell in nbformat.read(executed, as_version=4).cells)


def _stop_then_resume() -> tuple[dict, dict, Path]:
    """Run 07 stopped after step 2 in the kernel, then again into the same folder; return both metrics and it."""
    out = notebook_work_dir("nb_07_twice_") / "outputs"
    first = run_notebook("07_full_pretraining", {"output_dir": str(out), "launcher": "inprocess",
                                                 "nproc_per_node": 1, "stop_at_step": 2})
    return first, run_notebook("07_full_pretraining", {"output_dir": str(out)}), out


RUN = notebook_job(__name__, "test_notebook_07_full_pretraining_stops_resumes_and_reports_chance", _stop_then_resume)


def test_notebook_07_full_pretraining_stops_resumes_and_reports_chance():
    first, second, out = RUN.result()
    assert first["plan"] == {"config_name": "pretrain_emoji", "nproc_per_node": 1, "launcher": "inprocess",
                             "backend": "none"}
    assert first["launched"] is True and first["resumed_from_step"] is None
    assert first["finished"] is False and first["steps"] == 2  # stopped with a checkpoint, no evaluation yet
    assert "recall" not in first

    assert second["missing"] == [] and second["launched"] is True
    assert second["plan"] == {"config_name": "pretrain_emoji", "nproc_per_node": 2, "launcher": "torchrun",
                              "backend": "gloo"}
    # it continued from the first run's checkpoint rather than starting again
    assert second["resumed_from_step"] == 2 and second["finished"] is True and second["steps"] == 4
    assert second["logged_steps"] == [1, 2, 3, 4]
    log = Path(second["log_file"]).read_text()
    assert "resumed from" in log and "step 2" in log
    # progress while it ran, without flooding the saved notebook
    assert second["progress_lines"] >= 1 and _outputs(second["_executed"]) < 40
    # every split: recall, and chance beside it (K/N of N images for text -> image)
    assert second["eval_splits"] == MAIN_SPLITS
    assert set(second["recall"]) == set(second["chance"]) == set(MAIN_SPLITS)
    for split in MAIN_SPLITS:
        evaluation = json.loads((out / "runs" / "pretrain_emoji" / f"eval_{split}.json").read_text())
        assert second["recall"][split] == evaluation["headline"]
        assert second["chance"][split]["img_r1"] == pytest.approx(100.0 / evaluation["num_images"])
        assert 0 < second["chance"][split]["r_mean"] < 100
    assert set(second["loss_last"]) == {"align", "code", "ot", "itm"}  # the main recipe has no L_mlm
    # the 2-process evaluation at the end of training equals a single-process one, on every split
    assert second["distributed_vs_single_max_abs"] < 1e-9
    # without GPUs, ALBEF's data and cached weights, the paper's recipe must say what it lacks
    missing = "\n".join(second["paper_recipe_missing"])
    if not torch.cuda.is_available():
        assert "8 CUDA GPUs" in missing
    assert "data.train_files" in missing or "data.image_root" in missing
    # ALBEF: the loader reproduces ALBEF's own ITM logits, and a round trip through its format changes nothing
    assert second["albef_fixture_itm_max_abs"] is not None and second["albef_fixture_itm_max_abs"] < 1e-4
    assert second["albef_round_trip_max_abs"] == 0.0
    assert second["albef_checked"] is False  # no ALBEF checkpoint in CI
