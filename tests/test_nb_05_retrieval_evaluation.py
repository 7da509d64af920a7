"""Notebook 05 evaluates a short-pretrained tiny CODIS at CI size with ALBEF's protocol.

Its markdown quotes the main command's model (README command 1's checkpoint in runs/pretrain_emoji):
those numbers are Claims checked after codis-pretrain, against a run already made
(CODIS_NOTEBOOK_RUNS=notebooks/outputs, `test_reading_size_numbers`) or executed with CODIS_NOTEBOOK_SIZE=full.
"""
import pytest

from tests.markdown_claims import Claim, check_claims, check_full_run, notebook_size
from tests.nbharness import notebook_job, notebook_path, run_notebook

pytestmark = pytest.mark.slow  # executes a notebook with papermill (10-60 s)
MAIN_CHECKPOINT = "pretrain_emoji/checkpoint_final.pt"  # README command 1's, which the reading-size run scores

FULL = ("full",)
# The main command's checkpoint scored on CPU: recalls to their printed digit (0.15), counts exactly.
CLAIMS = [
    Claim(r"tiny CODIS trains <N>M parameters", "trainable_parameters_millions", 0.005, FULL),  # the corpus's vocabulary
    Claim(r"trunk, frozen \(<N>M parameters\)", "frozen_image_parameters_millions", 0.005),
    Claim(r"text retrieval <N> ->", "k0_txt_r1", 0.15, FULL),
    Claim(r"text retrieval \*\*[\d.]+\*\* -> <N>,", "k4_txt_r1", 0.15, FULL),
    Claim(r"image retrieval <N> ->", "k0_img_r1", 0.15, FULL),
    Claim(r"image retrieval \*\*[\d.]+\*\* -> <N>,", "k4_img_r1", 0.15, FULL),
    Claim(r"mean recall <N> contrastive", "k0_r_mean", 0.15, FULL),
    Claim(r"contrastive, <N> at \$k = 16\$", "k16_r_mean", 0.15, FULL),
    Claim(r"<N> at ALBEF's \$k = 128\$", "k128_r_mean", 0.15, FULL),
    Claim(r"lowers it \(<N> ->", "test_itc_r_mean", 0.15, FULL),
    Claim(r"lowers it \(\*\*[\d.]+\*\* -> <N>\)", "test_itm_r_mean", 0.15, FULL),
    Claim(r"left paste in only <N> of", "gradcam_composite_moved", 0, FULL),
    Claim(r"of <N> images, and the mean", "gradcam_composites", 0, FULL),
    Claim(r"right paste is <N>:", "gradcam_composite_shift_mean", 0.01, FULL),
]


# One run for both tests: README's command, `-p query "cat"` with interactive left True as a student runs it.
# With a query the widget box is skipped (its cell once hung under papermill in CI) and the query's own cell
# prints and draws; the fixed caption query, checked against the evaluation, runs since no widgets are drawn.
RUN = notebook_job(__name__, ("test_notebook_05_retrieval_evaluation",
                              "test_notebook_05_answers_your_words_under_papermill"),
                   lambda: run_notebook("05_retrieval_evaluation", {"size": notebook_size(), "query": "cat"},
                                        timeout_s=1800))


def test_notebook_05_retrieval_evaluation():
    size = notebook_size()
    metrics = RUN.result()
    k = 8 if size == "ci" else 128
    if size == "ci":
        assert metrics["trained_now"] is True and metrics["checkpoint_step"] == 40  # CI makes its own small model
        assert metrics["checkpoint"].endswith("pretrain_ci/checkpoint_final.pt")
    else:
        assert metrics["trained_now"] is False and metrics["checkpoint"].endswith(MAIN_CHECKPOINT)
    # both splits, new drawings of training concepts first; the worked example and the figures use it
    assert metrics["splits"] == ["new_drawings", "test"] and metrics["split"] == "new_drawings"
    assert list(metrics["by_split"]) == ["new_drawings", "test"]
    assert metrics["by_split"]["new_drawings"]["num_images"] == metrics["num_images"]
    assert metrics["by_split"]["new_drawings"]["itm"] == metrics["itm"]
    for name, result in metrics["by_split"].items():
        assert result["k"] == k and result["num_images"] > k, name
        for ranking in ("itc", "itm"):
            m = result[ranking]
            assert 0.0 <= m["txt_r1"] <= m["txt_r5"] <= m["txt_r10"] <= 100.0, (name, ranking)
            assert 0.0 <= m["img_r1"] <= m["img_r5"] <= m["img_r10"] <= 100.0, (name, ranking)
            # IR recall is a share of the split's captions: a multiple of 100 / num_texts
            steps = m["img_r10"] * result["num_texts"] / 100
            assert abs(steps - round(steps)) < 1e-6, (name, ranking)
    # by-hand (argsort) and library recalls agree except for exact float32 ties, which the notebook counts
    assert metrics["hand_vs_library_max_abs"] <= metrics["hand_vs_library_tie_bound"] + 1e-9
    assert metrics["rank_ties"] <= 0.05 * (metrics["num_images"] + metrics["num_texts"])
    assert metrics["rerank_max_abs_diff"] < 1e-5
    assert metrics["k"] == k and metrics["num_images"] > k
    assert metrics["pairs_scored"] <= metrics["pairs_requested"] == k * (metrics["num_images"] + metrics["num_texts"])
    # re-ranking depths cut from the one k-deep re-ranking: the deepest is the evaluation's, contrastive first
    depths = metrics["rerank_depths"]
    assert depths == ([2, 4, 8] if size == "ci" else [4, 16, 64, 128]) and depths[-1] == k
    by_depth = metrics["rerank_by_depth"]
    assert list(by_depth) == ["0"] + [str(d) for d in depths]
    assert by_depth["0"] == metrics["itc"] and by_depth[str(k)] == metrics["itm"]
    for depth in depths:  # at K >= depth the re-ranked top `depth` is the contrastive one: R@K cannot beat it
        if depth <= 10:
            assert by_depth[str(depth)]["img_r10"] <= by_depth["0"]["img_r10"] + 1e-9, depth
    for ranking in ("itc", "itm"):
        m = metrics[ranking]
        assert 0.0 <= m["txt_r1"] <= m["txt_r5"] <= m["txt_r10"] <= 100.0
        assert 0.0 <= m["img_r1"] <= m["img_r5"] <= m["img_r10"] <= 100.0
        assert abs(m["r_mean"] - (m["txt_r_mean"] + m["img_r_mean"]) / 2) < 1e-9
    # re-ranking only reorders each query's top k: recall at K = k is the same for both rankings
    assert metrics["tr_itm_recall_at_k"] == metrics["tr_itc_recall_at_k"]
    assert metrics["ir_itm_recall_at_k"] == metrics["ir_itc_recall_at_k"]
    assert metrics["figures"] == ["05_gradcam_layers.png", "05_gradcam_words.png", "05_image_to_text.png",
                                  "05_recall_curves.png", "05_text_to_image.png"]
    # Grad-CAM: one map per fusion layer, normalised caption maps sum to 1, the last layer's words get none
    assert metrics["gradcam_layers_drawn"] == list(range(metrics["gradcam_fusion_layers"])) == [0, 1]
    assert len(metrics["gradcam_caption_map_sums"]) == 3
    assert all(abs(total - 1.0) < 1e-5 for total in metrics["gradcam_caption_map_sums"])
    assert metrics["gradcam_last_layer_word_max"] == 0.0
    assert metrics["gradcam_composites"] == (8 if size == "ci" else 60)
    assert 0 <= metrics["gradcam_composite_moved"] <= metrics["gradcam_composites"]
    # the word panels show the words that name the emoji: never the group prefix's "emoji" nor a function word
    shown = [word for words in metrics["gradcam_words_shown"] for word in words]
    assert shown and "emoji" not in shown and not {"a", "an", "of", "the", "&", ":"} & set(shown)
    assert -1.0 <= metrics["gradcam_composite_shift_mean"] <= 1.0
    # the query box, run once without widgets (a query was given): a split caption gets the evaluation's scores
    assert metrics["query_box_interactive"] is False
    assert metrics["query_box_vs_evaluation_max_abs"] < 1e-4
    assert len(metrics["query_top_images"]) == len(metrics["query_top_captions"]) == 5
    checked = check_claims(notebook_path("05_retrieval_evaluation"), metrics, CLAIMS, size)
    assert len(checked) == sum(size in claim.sizes for claim in CLAIMS)


def test_reading_size_numbers():
    metrics = check_full_run(notebook_path("05_retrieval_evaluation"), CLAIMS)  # skipped unless the variable
    assert metrics["checkpoint"].endswith(MAIN_CHECKPOINT), f"{metrics['checkpoint']}: not README command 1's"


def test_notebook_05_answers_your_words_under_papermill():
    """`-p query "cat"`: the top images of the gallery are printed and recorded; no widget text is printed."""
    import nbformat

    metrics = RUN.result()
    assert metrics["query"] == "cat" and metrics["query_gallery"] == "new_drawings"
    names = metrics["query_top_names"]
    assert len(names) == 5 and all(isinstance(name, str) and name for name in names)
    assert 0 <= metrics["query_answering_in_top"] <= min(5, metrics["query_answering_images"])
    assert 0.0 <= metrics["query_chance_of_one_in_top"] <= 1.0
    executed = nbformat.read(metrics["_executed"], as_version=4)
    printed = "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "")
                      for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs)
    assert all(f"#{rank + 1} image" in printed and name in printed for rank, name in enumerate(names))
    assert '"cat" on new_drawings' in printed
    assert "VBox(" not in printed  # the query box is drawn as a widget only, never as its text form
    assert any("image/png" in output.get("data", {}) for cell in executed.cells if "query is not None" in cell.source
               for output in cell.outputs)  # and the query's top images are drawn
