"""Notebook 04 pretrains tiny CODIS at CI size: every loss term falls, and the checkpoint reloads exactly.

Its markdown quotes the reading-size run (240 steps): those numbers are Claims checked against a run already
made (CODIS_NOTEBOOK_RUNS=notebooks/outputs, `test_reading_size_numbers`) or executed with
CODIS_NOTEBOOK_SIZE=full; the constants (2 ln K, H(1/3)) at both sizes.
"""
import pytest

from tests.markdown_claims import Claim, check_claims, check_full_run, notebook_size
from tests.nbharness import notebook_job, notebook_path, run_notebook
from codis_lib.data.emoji_new_style import noto_font_path

MAIN_SPLITS = (["new_drawings", "new_style", "test"] if noto_font_path() is not None  # pretrain_emoji's splits,
               else ["new_drawings", "test"])  # less the held-out style where the Noto font is missing

pytestmark = pytest.mark.slow  # executes a notebook with papermill (10-60 s)

FULL = ("full",)
# One seeded CPU run, quoted to its last digit give or take about 1 % (other thread counts change the round-off).
CLAIMS = [
    Claim(r"<N>M parameters train", "trainable_parameters_millions", 0.005, FULL),  # the vocabulary is the corpus's
    Claim(r"from <N> at step 1 to about", "align_step1", 0.1, FULL),
    Claim(r"to about <N> within the first", "align_low_first_epoch", 0.1, FULL),
    Claim(r"within the first <N> steps", "align_low_step", 5, FULL),
    Claim(r"climbs back to about <N>:", "align_end_first_epoch", 0.1, FULL),
    Claim(r"falls steadily, to <N>\.", "align_last", 0.1, FULL),
    Claim(r"\$2\\ln K\$ = <N> for", "two_ln_K", 0.005),
    Claim(r"starts above that level, at <N>:", "code_step1", 0.05, FULL),
    Claim(r"other modality's codes: <N> at the end", "code_last", 0.05, FULL),
    Claim(r"teacher features \(<N> at step 1", "ot_step1", 0.02, FULL),
    Claim(r"at step 1, <N> at the end\)", "ot_last", 0.02, FULL),
    Claim(r"\$H\(1/3\)\$ = <N>,", "itm_chance_entropy", 0.005),
    Claim(r"falls slowly \(<N> at the end\)", "itm_last", 0.02, FULL),
    Claim(r"\$\\ln V\$ = <N> \(", "ln_vocab", 0.005, FULL),
    Claim(r"vocabulary; <N> at step 1\)", "mlm_step1", 0.05, FULL),
    Claim(r"It ends at <N>\.", "mlm_last", 0.1, FULL),
    Claim(r"It ends at <N> of", "perplexity_last", 0.1, FULL),
    Claim(r"have perplexity <N> and leave", "random_hard_perplexity", 0.05, FULL),
    Claim(r"and leave <N> codes dead", "random_dead_codes", 0.05, FULL),
    Claim(r"hard perplexity <N>, with", "hard_perplexity_step1", 0.1, FULL),
    Claim(r"with <N> codes dead\.", "dead_codes_step1", 1, FULL),
    Claim(r"a batch uses <N> codes", "codes_used_last", 1.0, FULL),
    Claim(r"\(<N> dead\) with", "dead_codes_last", 1.0, FULL),
    Claim(r"with hard perplexity <N>: no collapse", "hard_perplexity_last", 1.0, FULL),
    Claim(r"candidates \(<N> % at R@10", "zero_shot_chance_ir_r10", 0.05, FULL),
    Claim(r"R@10 for the <N> test images", "eval_images", 0, FULL),
    Claim(r"After this notebook's <N> steps", "steps", 0, FULL),
    Claim(r"the mean recall is <N> on new drawings", "new_drawings_r_mean", 1.0, FULL),
    Claim(r"new drawings and <N> on 500", "seen_r_mean", 1.0, FULL),
    Claim(r"but <N> on unseen concepts", "zero_shot_r_mean", 0.5, FULL),
]


RUN = notebook_job(__name__, "test_notebook_04_pretraining",
                   lambda: run_notebook("04_pretraining", {"size": notebook_size()}, timeout_s=1800))


def test_notebook_04_pretraining():
    size = notebook_size()
    metrics = RUN.result()
    assert metrics["lr_hand_vs_library_max_abs"] < 1e-12 and metrics["alpha_hand_vs_library_max_abs"] < 1e-12
    assert metrics["steps"] == (80 if size == "ci" else 240)
    assert set(metrics["terms"]) == {"align", "code", "ot", "itm", "mlm"}
    for term in metrics["terms"] + ["total"]:
        assert metrics[f"{term}_last"] < metrics[f"{term}_first"], f"L_{term} did not decrease"
    # L_code starts near 2 ln K (two uniform predictions) and must have learnt something.
    assert metrics["code_last"] < metrics["code_first"] - 0.3
    assert 1.0 < metrics["perplexity_last"] <= metrics["codebook_size"]
    # hard codes: at most the 2B predictions of a batch, and the random baseline above its exact lower bound
    K, n = metrics["codebook_size"], metrics["n_predictions"]
    assert 1.0 <= metrics["hard_perplexity_last"] <= min(K, n) and 0 <= metrics["dead_codes_last"] <= K
    assert abs(metrics["codes_used_last"] + metrics["dead_codes_last"] - K) < 1e-9
    assert abs(metrics["random_dead_codes"] - K * (1 - 1 / K) ** n) < 1e-9
    assert 1 / ((1 - 1 / K) / n + 1 / K) - 1.0 < metrics["random_hard_perplexity"] < K - metrics["random_dead_codes"] + 1.0
    # the end of training evaluates the splits of pretrain_emoji, new drawings of training concepts first
    assert metrics["eval_splits"] == MAIN_SPLITS
    assert 0.0 <= metrics["zero_shot_r_mean"] <= 100.0 and metrics["eval_images"] > 0
    assert 0.0 <= metrics["new_drawings_r_mean"] <= 100.0 and metrics["new_drawings_images"] > 0
    assert 0.0 <= metrics["seen_r_mean"] <= 100.0
    assert metrics["checkpoint_reloaded_identical"] is True
    # Section 5.1: ITM hard negatives by hand equal the library's under the same generator, and the sampler
    # never draws the positive (nor, with image ids, the same emoji) while following its weights.
    assert metrics["itm_sim_hand_vs_library_max_abs"] < 1e-5
    assert metrics["itm_weights_hand_vs_library_max_abs"] < 1e-6
    assert metrics["itm_index_mismatches"] == 0
    assert metrics["itm_loss_hand_vs_library_abs"] < 1e-6 and 0.0 < metrics["itm_loss_hand"] < 5.0
    assert metrics["itm_draws"] >= 1000 and metrics["itm_rows"] >= 16
    assert metrics["itm_forbidden_draws_finetune"] == 0 and metrics["itm_positive_draws_pretrain"] == 0
    # without image ids the twin of the same emoji is a legitimate draw, about as often as its weight says
    assert metrics["itm_twin_weight_pretrain"] > 0.0
    twin, trials = metrics["itm_twin_weight_pretrain"], metrics["itm_draws"] * metrics["itm_rows"]
    twin_bound = 5 * (twin * (1 - twin) / trials) ** 0.5  # 5 binomial standard deviations
    assert abs(metrics["itm_twin_draw_fraction_pretrain"] - twin) < twin_bound
    assert metrics["itm_frequency_cells"] > 0 and metrics["itm_frequency_max_z"] < 5.0
    # Section 5.2: MLM masking by hand equals mask_tokens under the same generator; the measured proportions
    # are within 4 binomial standard deviations of ALBEF's 15 % and 80 / 10 / 10.
    assert metrics["mlm_masking_mismatches"] == 0
    expected = {"chosen": 0.15, "to_mask": 0.8, "unchanged": 0.1, "to_random": 0.1}
    for name, rate in expected.items():
        assert abs(metrics[f"mlm_{name}_expected"] - rate) < 1e-3, name  # up to the 1/V of a random id
        assert 0.0 < metrics[f"mlm_{name}_bound"] < 0.02, name
        measured, bound = metrics[f"mlm_{name}_fraction"], metrics[f"mlm_{name}_bound"]
        assert abs(measured - metrics[f"mlm_{name}_expected"]) <= bound, name
    assert metrics["mlm_tokens_eligible"] >= 100_000
    assert metrics["mlm_special_chosen"] == metrics["mlm_unchosen_changed"] == metrics["mlm_label_errors"] == 0
    assert metrics["mlm_sep_or_mask_in_captions"] == 0
    assert metrics["mlm_loss_hand_vs_library_abs"] < 1e-5 and metrics["mlm_loss_hand"] > 0.0
    # Section 5.3: the per-sample-seed draws of training, by hand, give the model's own L_itm and L_mlm.
    assert metrics["itm_seeded_index_mismatches"] == 0
    assert metrics["itm_forward_hand_vs_model_abs"] < 1e-5 and metrics["mlm_forward_hand_vs_model_abs"] < 1e-4
    checked = check_claims(notebook_path("04_pretraining"), metrics, CLAIMS, size)
    assert len(checked) == sum(size in claim.sizes for claim in CLAIMS)


def test_reading_size_numbers():
    check_full_run(notebook_path("04_pretraining"), CLAIMS)  # skipped unless $CODIS_NOTEBOOK_RUNS
