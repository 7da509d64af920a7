"""Notebook 06 assigns codes by hand and with CODIS.assign_codes, and draws usage, UMAP and the code gallery.

Its markdown quotes the main command's model: those numbers are Claims checked after codis-pretrain
(README command 1), against a run already made (CODIS_NOTEBOOK_RUNS=notebooks/outputs,
`test_reading_size_numbers`) or executed with CODIS_NOTEBOOK_SIZE=full.
"""
import pytest

from tests.markdown_claims import Claim, check_claims, check_full_run, notebook_size
from tests.nbharness import notebook_job, notebook_path, run_notebook

pytestmark = pytest.mark.slow  # executes a notebook with papermill (10-60 s)
MAIN_CHECKPOINT = "pretrain_emoji/checkpoint_final.pt"  # README command 1's, which the reading-size run scores


def _random_occupancy_bounds(n: int, K: int) -> tuple[float, float]:
    """Return exact bounds on the expected perplexity of n uniform throws into K bins.

    Above: a histogram's perplexity never exceeds its occupied bins, whose expected number is
    K (1 - (1 - 1/K)^n). Below: perplexity >= 1 / sum f_k^2, and by Jensen E[1 / X] >= 1 / E[X]
    with E[sum f_k^2] = (1 - 1/K) / n + 1/K.
    """
    return 1.0 / ((1 - 1 / K) / n + 1 / K), K * (1 - (1 - 1 / K) ** n)


FULL = ("full",)
# The main command's checkpoint: cosines to 0.01, percentages to 0.1, code counts exactly.
CLAIMS = [
    Claim(r"own caption have mean cosine <N>", "own_caption_cos", 0.01, FULL),
    Claim(r"images and of captions <N>\.", "centre_cos_images_captions", 0.01, FULL),
    Claim(r"share their hard code <N> of the time", "new_drawings_same_code_rate_percent", 0.1, FULL),
    Claim(r"against <N> by chance", "new_drawings_same_code_chance_percent", 0.1, FULL),
    Claim(r"codes that no image picks: <N>,", "new_drawings_image_unused_codes", 0, FULL),
    Claim(r"that no caption picks: <N>\.", "new_drawings_text_unused_codes", 0, FULL),
    Claim(r"the agreement falls to <N>", "test_same_code_rate_percent", 0.1, FULL),
    Claim(r"\(chance <N>\)", "test_same_code_chance_percent", 0.1, FULL),
    Claim(r"no caption picks rise to <N>:", "test_text_unused_codes", 0, FULL),
]


RUN = notebook_job(__name__, "test_notebook_06_codebook_visualization",
                   lambda: run_notebook("06_codebook_visualization", {"size": notebook_size()}, timeout_s=1800))


def test_notebook_06_codebook_visualization():
    size = notebook_size()
    metrics = RUN.result()
    main_run = "pretrain_ci" if size == "ci" else "pretrain_emoji"  # CI trains its own; full reads codis-pretrain's
    assert metrics["trained_now"] is (size == "ci")
    assert metrics["checkpoint"].endswith(f"{main_run}/checkpoint_final.pt")
    assert metrics["hand_vs_library_max_abs"] < 1e-5
    K = metrics["num_codes"]
    # the code statistics cover both splits; the drawn one is new drawings of training concepts
    assert metrics["splits"] == ["new_drawings", "test"] and metrics["split"] == "new_drawings"
    assert list(metrics["by_split"]) == ["new_drawings", "test"]
    assert metrics["by_split"]["new_drawings"]["num_images"] == metrics["num_images"] > 0
    # the hard-code perplexity by hand is codebook_usage's on one-hot assignments
    assert metrics["hard_perplexity_vs_library_rel"] < 1e-5
    for name, row in metrics["by_split"].items():
        for modality, n in (("image", row["num_images"]), ("text", row["num_texts"])):
            assert n > 0, (name, modality)
            hard, active = row[f"{modality}_hard_perplexity"], row[f"{modality}_active_codes"]
            assert 1.0 - 1e-9 <= hard <= active + 1e-9 and active <= min(K, n), (name, modality)
            # the Monte Carlo baseline lies within the exact bounds, up to 4 standard errors of its mean
            low, high = _random_occupancy_bounds(n, K)
            slack = 4 * row[f"{modality}_random_perplexity_sd"] / metrics["random_draws"] ** 0.5
            assert low - slack <= row[f"{modality}_random_perplexity"] <= high + slack, (name, modality, low, high)
        assert 0.0 <= row["same_code_chance"] <= 1.0 and 0.0 <= row["same_code_rate"] <= 1.0, name
    main = metrics["by_split"]["new_drawings"]
    assert metrics["image_hard_perplexity"] == main["image_hard_perplexity"]
    assert metrics["same_code_rate"] == main["same_code_rate"] and metrics["same_code_chance"] == main["same_code_chance"]
    assert 1.0 <= metrics["ot_image_hard_perplexity"] <= min(K, metrics["num_images"]) + 1e-6
    # the mean soft assignment's perplexity, kept for reference
    for key in ("image_soft_perplexity", "text_soft_perplexity", "ot_image_soft_perplexity"):
        assert 1.0 <= metrics[key] <= K + 1e-6, key
    # Sinkhorn's equal-partition constraint spreads the split over more codes than the softmax arg-max does
    assert metrics["ot_image_soft_perplexity"] >= metrics["image_soft_perplexity"] - 1e-6
    assert 1 <= metrics["image_active_codes"] <= min(K, metrics["num_images"])
    assert 0.0 < metrics["soft_overlap_mismatched"] < 1.0 and 0.0 < metrics["soft_overlap_matched"] < 1.0
    shown = metrics["codes_shown"]
    assert 1 <= len(shown) <= (4 if size == "ci" else 8) and len(set(shown)) == len(shown)
    assert metrics["figures"] == ["06_code_gallery.png", "06_code_usage.png", "06_umap.png"]
    checked = check_claims(notebook_path("06_codebook_visualization"), metrics, CLAIMS, size)
    assert len(checked) == sum(size in claim.sizes for claim in CLAIMS)


def test_reading_size_numbers():
    metrics = check_full_run(notebook_path("06_codebook_visualization"), CLAIMS)  # skipped unless the variable
    assert metrics["checkpoint"].endswith(MAIN_CHECKPOINT), f"{metrics['checkpoint']}: not README command 1's"
