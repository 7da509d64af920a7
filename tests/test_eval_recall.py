"""Recall@K on hand-built score matrices with known answers (several captions per image, ties, -100 fill)."""
import numpy as np
import pytest
import torch

from codis_lib.evaluation.retrieval import (
    check_retrieval_mapping,
    contrastive_topk,
    query_slice,
    ranks_of_best_match,
    recall_from_ranks,
    retrieval_metrics,
)

# 3 images; image 0 has captions 0,1; image 1 has 2,3,4; image 2 has 5.
TXT2IMG = [0, 0, 1, 1, 1, 2]
IMG2TXT = [[0, 1], [2, 3, 4], [5]]

SCORES_I2T = torch.tensor([
    [0.1, 0.9, 0.8, 0.2, 0.3, 0.0],   # best correct (caption 1) is the top score -> rank 0
    [0.9, 0.1, 0.2, 0.5, 0.3, 0.8],   # best correct 0.5 (caption 3); captions 0 and 5 above -> rank 2
    [0.5, 0.4, 0.3, 0.2, 0.1, 0.05],  # its only caption is last of 6 -> rank 5
])
SCORES_T2I = torch.tensor([
    [0.9, 0.1, 0.2],  # caption 0 -> image 0 first: rank 0
    [0.1, 0.2, 0.3],  # caption 1 -> image 0 last: rank 2
    [0.5, 0.5, 0.1],  # caption 2 -> image 1 tied with image 0: ties count against -> rank 1
    [0.0, 1.0, 0.0],  # rank 0
    [0.3, 0.2, 0.1],  # caption 4 -> image 1 second: rank 1
    [0.0, 0.0, 0.7],  # rank 0
])


def test_ranks_known_answers():
    assert ranks_of_best_match(SCORES_I2T, IMG2TXT).tolist() == [0, 2, 5]
    assert ranks_of_best_match(SCORES_T2I, [[i] for i in TXT2IMG]).tolist() == [0, 2, 1, 0, 1, 0]


def test_metrics_known_answers():
    metrics = retrieval_metrics(SCORES_I2T, SCORES_T2I, TXT2IMG, IMG2TXT)
    expected = {"txt_r1": 100 / 3, "txt_r5": 200 / 3, "txt_r10": 100.0,
                "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert metrics["txt_r_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)
    assert metrics["img_r_mean"] == pytest.approx(250 / 3)
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2)
    # other K: rank 2 and rank 1 distinguish R@2 from R@3
    other = retrieval_metrics(SCORES_I2T, SCORES_T2I, TXT2IMG, IMG2TXT, ks=(2, 3))
    assert other["txt_r2"] == pytest.approx(100 / 3) and other["txt_r3"] == pytest.approx(200 / 3)
    assert other["img_r2"] == pytest.approx(500 / 6) and other["img_r3"] == pytest.approx(100.0)


def test_any_caption_counts_for_text_retrieval():
    # image 1's captions 2 and 4 are far down, but caption 3 is first: the image counts at R@1
    scores = torch.tensor([[0.0, 0.0, -5.0, 9.0, -5.0, 1.0]])
    assert ranks_of_best_match(scores, [[2, 3, 4]]).tolist() == [0]


def test_ties_among_own_captions_are_free_but_ties_with_wrong_ones_are_not():
    own_tie = torch.tensor([[1.0, 1.0, 0.5]])  # captions 0 and 1 both correct and tied at the top
    assert ranks_of_best_match(own_tie, [[0, 1]]).tolist() == [0]
    wrong_tie = torch.tensor([[1.0, 1.0, 0.5]])  # caption 1 is correct, tied with the wrong caption 0
    assert ranks_of_best_match(wrong_tie, [[1]]).tolist() == [1]
    # a scorer that returns the same number everywhere retrieves nothing at R@1
    constant = retrieval_metrics(torch.zeros(3, 6), torch.zeros(6, 3), TXT2IMG, IMG2TXT)
    assert constant["txt_r1"] == 0.0 and constant["img_r1"] == 0.0
    assert constant["img_r5"] == 100.0  # 3 images: every rank (2) is < 5


def test_recall_does_not_depend_on_candidate_order_even_with_ties():
    generator = torch.Generator().manual_seed(0)
    num_images, per_image = 7, 3
    txt2img = [i for i in range(num_images) for _ in range(per_image)]
    img2txt = [[i * per_image + j for j in range(per_image)] for i in range(num_images)]
    # integer-valued scores make ties frequent
    scores_i2t = torch.randint(0, 4, (num_images, len(txt2img)), generator=generator).float()
    scores_t2i = torch.randint(0, 4, (len(txt2img), num_images), generator=generator).float()
    reference = retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    text_perm = torch.randperm(len(txt2img), generator=generator)
    image_perm = torch.randperm(num_images, generator=generator)
    new_index_of_text = torch.argsort(text_perm)  # old text t is at new position new_index_of_text[t]
    new_index_of_image = torch.argsort(image_perm)
    p_txt2img = [int(new_index_of_image[txt2img[int(old)]]) for old in text_perm]
    p_img2txt = [[int(new_index_of_text[t]) for t in img2txt[int(old)]] for old in image_perm]
    permuted = retrieval_metrics(scores_i2t[image_perm][:, text_perm], scores_t2i[text_perm][:, image_perm],
                                 p_txt2img, p_img2txt)
    assert permuted == pytest.approx(reference)


def _first_correct_position(score_row: np.ndarray, correct: list[int]) -> int:
    """Position of the first correct candidate when candidates are listed by decreasing score."""
    order = sorted(range(len(score_row)), key=lambda c: -score_row[c])
    return min(order.index(c) for c in correct)


def test_matches_position_of_first_correct_in_sorted_order_without_ties():
    rng = np.random.default_rng(3)
    num_images = 20
    captions_per_image = rng.integers(1, 6, size=num_images)
    img2txt, txt2img = [], []
    for image, count in enumerate(captions_per_image):
        img2txt.append(list(range(len(txt2img), len(txt2img) + count)))
        txt2img.extend([image] * count)
    scores_i2t = rng.standard_normal((num_images, len(txt2img)))  # continuous: no ties
    scores_t2i = rng.standard_normal((len(txt2img), num_images))
    ranks_tr = [_first_correct_position(scores_i2t[i], img2txt[i]) for i in range(num_images)]
    ranks_ir = [_first_correct_position(scores_t2i[t], [txt2img[t]]) for t in range(len(txt2img))]
    assert ranks_of_best_match(scores_i2t, img2txt).tolist() == ranks_tr
    metrics = retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    for k in (1, 5, 10):
        assert metrics[f"txt_r{k}"] == pytest.approx(100 * np.mean(np.array(ranks_tr) < k))
        assert metrics[f"img_r{k}"] == pytest.approx(100 * np.mean(np.array(ranks_ir) < k))


def test_candidates_outside_the_top_k_never_count():
    # ALBEF's re-ranked matrix: ITM logits in the top k (k=2 here), -100 everywhere else. The correct
    # caption 7 is outside the top k, tied at -100 with 9 wrong captions: it must not count at R@10.
    scores = torch.full((1, 12), -100.0)
    scores[0, 3], scores[0, 5] = 2.0, 1.0
    assert ranks_of_best_match(scores, [[7]]).tolist() == [11]
    assert recall_from_ranks(torch.tensor([11]), (10,)) == {10: 0.0}


def test_contrastive_topk_breaks_ties_by_lower_index():
    similarity = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    topk_sim, topk_index = contrastive_topk(similarity, 3)
    assert topk_index.tolist() == [[1, 3, 0]]
    assert torch.equal(topk_sim, similarity[:, [1, 3, 0]])
    assert contrastive_topk(similarity, 99)[1].shape == (1, 5)  # k capped at the number of candidates
    with pytest.raises(ValueError, match="k must be >= 1"):
        contrastive_topk(similarity, 0)


@pytest.mark.parametrize("num_queries", [0, 1, 7, 16, 1000])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_query_slices_cover_every_query_once(num_queries, world_size):
    covered = []
    for rank in range(world_size):
        block = query_slice(num_queries, rank, world_size)
        covered.extend(range(block.start, block.stop))
    assert covered == list(range(num_queries))


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"txt2img\[1\] = 1"):
        check_retrieval_mapping([0, 1], [[0, 1], []])
    with pytest.raises(ValueError, match=r"img2txt\[1\] is empty"):
        check_retrieval_mapping([0, 0], [[0, 1], []])
    with pytest.raises(ValueError, match="missing from img2txt"):
        check_retrieval_mapping([0, 0], [[0]])
    with pytest.raises(ValueError, match="outside"):
        check_retrieval_mapping([0, 5], [[0, 1]])
    with pytest.raises(ValueError, match="scores_i2t has shape"):
        retrieval_metrics(SCORES_T2I, SCORES_T2I, TXT2IMG, IMG2TXT)
    nan_scores = SCORES_T2I.clone()
    nan_scores[4, 1] = float("nan")
    with pytest.raises(ValueError, match="scores_t2i contains NaN .*row 4"):
        retrieval_metrics(SCORES_I2T, nan_scores, TXT2IMG, IMG2TXT)
