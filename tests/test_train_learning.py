"""Training tiny CODIS on the (small) emoji corpus lowers every loss term."""
import pytest

from codis_lib.run_config import load_run_config
from codis_lib.train.engine import train
from tests.helpers import tiny_run_overrides

STEPS = 80
WINDOW = 8  # compare the mean of the first and of the last WINDOW steps (single steps are noisy)


@pytest.mark.slow
def test_training_lowers_every_loss_term(tmp_path):
    overrides = tiny_run_overrides(tmp_path / "run", STEPS) + [
        "train.epochs=100", "train.batch_size=16", "model.queue_size=64", "train.optimizer.lr=1e-3",
        "model.losses.mlm=true"]  # all five terms (the main recipe drops L_mlm)
    result = train(load_run_config("pretrain_emoji", overrides=overrides))
    assert result.steps == STEPS and len(result.records) == STEPS
    terms = sorted(k for k in result.records[0] if k.startswith("loss/"))
    assert terms == ["loss/align", "loss/code", "loss/itm", "loss/mlm", "loss/ot"]
    report = {}
    for key in terms + ["loss"]:
        first = sum(r[key] for r in result.records[:WINDOW]) / WINDOW
        last = sum(r[key] for r in result.records[-WINDOW:]) / WINDOW
        report[key] = (round(first, 3), round(last, 3))
    print(report)
    for key, (first, last) in report.items():
        assert last < first, f"{key} did not decrease: first {WINDOW} steps {first}, last {WINDOW} steps {last}"
    assert report["loss"][0] - report["loss"][1] > 1.0  # a clear drop of the total, not noise
