"""experiments/diagnose.py: variants parse and validate, and a tiny end-to-end run writes every field in range."""
import json
import math
from pathlib import Path

import pytest

from tests.fixtures_data.corpus import small_emoji_corpus
from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "diagnose.py"
RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def _diagnose():
    return load_script(SCRIPT)


def test_custom_variants_parse_and_every_variant_is_checked_before_training(tmp_path):
    diagnose = _diagnose()
    name, overrides = diagnose.parse_variant("mine=model.momentum=0.99,model.losses.itm=false,data.train_files=[a, b]")
    assert name == "mine" and overrides == {"model.momentum": 0.99, "model.losses.itm": False,
                                            "data.train_files": ["a", "b"]}
    args = diagnose.parse_args(["--variants", "clip", "codis", "--variant", "mine=model.alpha=0.2",
                                "--data-root", str(tmp_path)])
    assert list(diagnose.select_variants(args)) == ["clip", "codis", "mine"]
    assert set(diagnose.select_variants(diagnose.parse_args([]))) == set(diagnose.BUILTIN_VARIANTS)
    with pytest.raises(SystemExit, match="unknown variant.*nope"):
        diagnose.select_variants(diagnose.parse_args(["--variants", "nope"]))
    with pytest.raises(SystemExit, match=r"variant bad:.*no_such_key"):
        diagnose.select_variants(diagnose.parse_args(["--variant", "bad=model.no_such_key=1"]))
    with pytest.raises(SystemExit, match=r"variant odd:.*queue_size"):  # the queue must stay divisible by the batch
        diagnose.select_variants(diagnose.parse_args(["--variant", "odd=model.queue_size=100"]))


def test_random_occupancy_perplexity_is_between_one_and_the_number_of_throws():
    diagnose = _diagnose()
    assert diagnose.random_occupancy_perplexity(1, 64) == pytest.approx(1.0)
    few, many = diagnose.random_occupancy_perplexity(256, 64), diagnose.random_occupancy_perplexity(256, 4096)
    assert 40 < few < 64 and 200 < many < 256


def _check_run(run: dict) -> None:
    assert {"variant", "seed", "steps", "mode", "temperature", "probe", "retrieval", "final_losses"} <= set(run)
    temperature = run["temperature"]
    assert temperature["points"] and 0 < temperature["min"] <= temperature["final"] + 1e-12
    expected_terms = {"i2t", "t2i"} | ({"i2i", "t2t"} if run["mode"] == "codis" else set())
    assert set(run["probe"]["alignment"]) == expected_terms
    for term in run["probe"]["alignment"].values():
        assert -1 <= term["negative"] <= 1 and -1 <= term["positive"] <= 1
    assert set(run["retrieval"]) == {"new_drawings", "test", "train1k"}
    for metrics in run["retrieval"].values():
        assert all(0 <= metrics[key] <= 100 for key in RECALL_KEYS)
    codes = run["probe"]["codes"]
    if run["mode"] != "codis":
        assert codes is None
        return
    k, ln_k = codes["num_codes"], math.log(codes["num_codes"])
    for key in ("hard_perplexity_image", "hard_perplexity_text", "random_perplexity"):
        assert 1 - 1e-6 <= codes[key] <= k + 1e-6, key
    for key in ("target_entropy_image", "target_entropy_text", "prediction_entropy_image", "prediction_entropy_text"):
        assert -1e-6 <= codes[key] <= ln_k + 1e-5, key
    assert codes["kl_target_image_to_text_student"] >= -1e-6 and codes["kl_target_text_to_image_student"] >= -1e-6
    assert 0 <= codes["agreement"] <= 100 and 0 <= codes["agreement_chance"] <= 100


@pytest.mark.slow
def test_a_tiny_diagnosis_writes_every_field_for_every_run(tmp_path, capsys):
    root, _ = small_emoji_corpus()
    out = tmp_path / "results.json"
    argv = ["--steps", "3", "--seeds", "0", "--variants", "clip", "codis", "--data-root", str(root),
            "--out-dir", str(tmp_path / "runs"), "--json", str(out), "--set", "model.vision.image_size=32",
            "--set", "model.queue_size=32", "--set", "train.batch_size=8"]
    assert _diagnose().main(argv) == 0
    printed = capsys.readouterr().out
    assert "| clip | 1 |" in printed and "| codis | 1 |" in printed and "arg-max codes" in printed
    results = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [("clip", 0), ("codis", 0)]
    for run in results["runs"]:
        _check_run(run)
    assert set(results["summary"]) == {"clip", "codis"} and results["paired_split"] == "new_drawings"
    assert results["paired"]["clip"]["seeds"] == 1 and "0" in results["paired"]["clip"]["per_seed"]
    assert results["summary"]["codis"]["hard_perplexity_image"] is not None
