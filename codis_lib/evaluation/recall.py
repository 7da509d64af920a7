"""Recall at K on retrieval score matrices, as ALBEF's `itm_eval` computes it, with deterministic ties.

Text retrieval (TR, image -> captions) counts an image as correct at K if ANY of its captions is
among the top K; image retrieval (IR, caption -> images) counts a caption as correct at K if its
one image is among the top K. R@1/5/10 in percent, their per-direction means and the overall mean
(`r_mean`), under ALBEF's key names (`txt_r1` ... `img_r10`, `txt_r_mean`, `img_r_mean`, `r_mean`).

Ties are handled deterministically, in two places:
- Top-k selection (`contrastive_topk` in codis_lib/evaluation/rerank.py) uses a stable descending
  sort: among equal similarities the lower candidate index comes first (torch.topk gives no such
  guarantee).
- Recall is pessimistic about ties: the rank of a query is the number of NON-matching candidates whose
  score is >= the best matching candidate's score. A tie with a wrong candidate therefore never helps
  (a constant scorer gets R@1 = 0, not an accident of dataset order), while ties among a query's own
  correct captions cost nothing. Without ties this is exactly ALBEF's rank (position of the first
  correct item in the descending order), and the result does not depend on the order of the dataset.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

DEFAULT_RECALL_KS = (1, 5, 10)


def check_retrieval_mapping(txt2img: Sequence[int], img2txt: Sequence[Sequence[int]]) -> None:
    """Return None if `txt2img` and `img2txt` describe the same captions; raise ValueError naming the entry otherwise."""
    num_images, num_texts = len(img2txt), len(txt2img)
    for text_index, image_index in enumerate(txt2img):
        if not 0 <= int(image_index) < num_images:
            raise ValueError(f"txt2img[{text_index}] = {image_index}, outside [0, {num_images}) "
                             f"(len(img2txt) = {num_images})")
    seen = [False] * num_texts
    for image_index, caption_indices in enumerate(img2txt):
        if len(caption_indices) == 0:
            raise ValueError(f"img2txt[{image_index}] is empty: image {image_index} has no caption, "
                             "so text retrieval could never find it")
        for text_index in caption_indices:
            text_index = int(text_index)
            if not 0 <= text_index < num_texts:
                raise ValueError(f"img2txt[{image_index}] contains caption {text_index}, outside "
                                 f"[0, {num_texts}) (len(txt2img) = {num_texts})")
            if int(txt2img[text_index]) != image_index:
                raise ValueError(f"img2txt[{image_index}] lists caption {text_index} but "
                                 f"txt2img[{text_index}] = {txt2img[text_index]}")
            if seen[text_index]:
                raise ValueError(f"caption {text_index} is listed twice in img2txt")
            seen[text_index] = True
    for text_index, image_index in enumerate(txt2img):
        if not seen[text_index]:
            raise ValueError(f"caption {text_index} (txt2img -> image {image_index}) is missing from "
                             f"img2txt[{image_index}]")


def _as_score_tensor(scores, name: str, expected_shape: tuple[int, int]) -> torch.Tensor:
    """Return `scores` as a 2-d float tensor on CPU, after checking its shape and finiteness."""
    scores = torch.as_tensor(scores).detach().cpu()
    if not scores.is_floating_point():
        scores = scores.double()
    if tuple(scores.shape) != expected_shape:
        raise ValueError(f"{name} has shape {tuple(scores.shape)}, expected {expected_shape} "
                         "(queries x candidates)")
    if torch.isnan(scores).any():
        row = int(torch.isnan(scores).any(dim=1).nonzero()[0])
        raise ValueError(f"{name} contains NaN (first in row {row})")
    return scores


def ranks_of_best_match(scores, positives: Sequence[Sequence[int]], chunk_rows: int = 1024) -> torch.Tensor:
    """Return each query's rank (0 = first) of its best-scored correct candidate, counting ties against it.

    scores: (Q, C) query x candidate scores (higher = better). positives[q]: the correct candidates of
    query q (non-empty). rank[q] = number of incorrect candidates with score >= the best correct score.
    """
    scores = torch.as_tensor(scores)
    num_queries, num_candidates = scores.shape
    if len(positives) != num_queries:
        raise ValueError(f"positives has {len(positives)} entries but scores has {num_queries} rows")
    row_index = torch.tensor([q for q, cols in enumerate(positives) for _ in cols], dtype=torch.long)
    col_index = torch.tensor([int(c) for cols in positives for c in cols], dtype=torch.long)
    if len(col_index) and (col_index.min() < 0 or col_index.max() >= num_candidates):
        raise ValueError(f"a positive candidate index is outside [0, {num_candidates})")
    counts = torch.bincount(row_index, minlength=num_queries)
    if (counts == 0).any():
        raise ValueError(f"query {int((counts == 0).nonzero()[0])} has no correct candidate")

    positive_scores = scores[row_index, col_index]  # (P,)
    best_positive = torch.full((num_queries,), -math.inf, dtype=scores.dtype)
    best_positive.scatter_reduce_(0, row_index, positive_scores, reduce="amax")  # (Q,)
    # correct candidates that reach the best correct score are not counted against the query
    positives_at_best = torch.zeros(num_queries, dtype=torch.long)
    positives_at_best.scatter_add_(0, row_index, (positive_scores >= best_positive[row_index]).long())
    at_least_best = torch.empty(num_queries, dtype=torch.long)
    for start in range(0, num_queries, chunk_rows):  # chunks bound the (rows, C) boolean temporary
        stop = min(num_queries, start + chunk_rows)
        at_least_best[start:stop] = (scores[start:stop] >= best_positive[start:stop, None]).sum(dim=1)
    return at_least_best - positives_at_best


def recall_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_RECALL_KS) -> dict[int, float]:
    """Return {K: percentage of queries with rank < K}."""
    ranks = torch.as_tensor(ranks)
    if ranks.numel() == 0:
        raise ValueError("no queries: cannot compute recall of an empty set")
    return {int(k): 100.0 * float((ranks < k).double().mean()) for k in ks}


def retrieval_metrics(scores_i2t, scores_t2i, txt2img: Sequence[int], img2txt: Sequence[Sequence[int]],
                      ks: Sequence[int] = DEFAULT_RECALL_KS) -> dict[str, float]:
    """Return ALBEF's metric dict (txt_r1.., txt_r_mean, img_r1.., img_r_mean, r_mean) from two score matrices.

    scores_i2t: (num_images, num_texts), used for text retrieval (TR: an image is correct at K if any
    of its captions is in its top K). scores_t2i: (num_texts, num_images), used for image retrieval.
    """
    check_retrieval_mapping(txt2img, img2txt)
    num_images, num_texts = len(img2txt), len(txt2img)
    scores_i2t = _as_score_tensor(scores_i2t, "scores_i2t", (num_images, num_texts))
    scores_t2i = _as_score_tensor(scores_t2i, "scores_t2i", (num_texts, num_images))
    text_recall = recall_from_ranks(ranks_of_best_match(scores_i2t, img2txt), ks)
    image_recall = recall_from_ranks(ranks_of_best_match(scores_t2i, [[int(i)] for i in txt2img]), ks)
    metrics = {f"txt_r{k}": v for k, v in text_recall.items()}
    metrics["txt_r_mean"] = sum(text_recall.values()) / len(text_recall)
    metrics.update({f"img_r{k}": v for k, v in image_recall.items()})
    metrics["img_r_mean"] = sum(image_recall.values()) / len(image_recall)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics
