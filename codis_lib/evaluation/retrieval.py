"""Image-text retrieval evaluation with ALBEF's protocol, its ITM re-ranking batched over many queries.

The protocol is ALBEF's `Retrieval.py` (`evaluation` + `itm_eval`), which the CODIS paper reuses:

1. Unimodal features of every image and every caption are computed once: the encoder outputs
   (`image_embeds`, `text_embeds`, kept for the fusion encoder) and the projected unit features.
2. The contrastive similarity `image_feat @ text_feat.T` ranks all candidates (no temperature: only
   the order matters).
3. For every query (an image for text retrieval, a caption for image retrieval) its top k candidates
   are re-scored with the ITM head through the fusion encoder. As in ALBEF's `Retrieval.py`, the
   re-ranked score of a candidate is the ITM *match logit alone* (column 1 of `itm_logits`, not a
   probability and not added to the contrastive similarity); every candidate outside the top k gets
   -100. BLIP later added the contrastive similarity to the ITM logit; that variant is available as
   `score_mode="itm_plus_sim"` but is not ALBEF's and not the default.
4. Text retrieval (TR, image -> captions) counts an image as correct at K if ANY of its captions is
   among the top K; image retrieval (IR, caption -> images) counts a caption as correct at K if its
   one image is among the top K. R@1/5/10 in percent, their per-direction means and the overall mean
   (`r_mean`), under ALBEF's key names (`txt_r1` ... `img_r10`, `txt_r_mean`, `img_r_mean`, `r_mean`).

Ties are handled deterministically, in two places:
- Top-k selection uses a stable descending sort: among equal similarities the lower candidate index
  comes first (torch.topk gives no such guarantee).
- Recall is pessimistic about ties: the rank of a query is the number of NON-matching candidates whose
  score is >= the best matching candidate's score. A tie with a wrong candidate therefore never helps
  (a constant scorer gets R@1 = 0, not an accident of dataset order), while ties among a query's own
  correct captions cost nothing. Without ties this is exactly ALBEF's rank (position of the first
  correct item in the descending order), and the result does not depend on the order of the dataset.

Re-ranking is the expensive part (k fusion passes per query, for both directions). ALBEF runs one
query at a time (a fusion batch of k pairs); `itm_rerank_one_query_at_a_time` keeps that as the
reference. `itm_rerank_batched` gives the same scores with less work:
- all (query, candidate) pairs of both directions go into one list, and each distinct (image,
  caption) pair is scored once (a caption in an image's top k whose image is also in the caption's
  top k is needed by both directions);
- pairs are grouped by image, and each fusion call gets that image's tokens once, (1, N, D), which
  the cross-attention broadcasts over up to `pair_batch_size` captions: the keys and values of the
  image tokens are computed once per image rather than once per pair;
- inside a group the captions are sorted by length and each batch is trimmed to its longest caption
  (padded keys get zero attention weight, so trimming them does not change the real tokens' outputs);
- the first fusion layer's self-attention sees the caption only, so it is computed once per caption
  (`share_text_work`), not once per pair;
- the last fusion layer runs at [CLS] only (`first_token_only`), the one position the ITM head reads,
  and that position's self-attention needs no projection of the other tokens (model/bert.py).
`share_image_tokens=False` instead fills batches with any pairs (for a fusion encoder that does not
broadcast); tests/test_eval_rerank.py checks the settings against the reference to 1e-5.

What this buys depends on where the loop's time goes. On a CPU the one-query loop is already
compute-bound (k = 128 pairs per call keep the matrix units busy), so only removed work counts:
benchmarks/bench_rerank.py measures 3.4-3.5x on the tiny model at k = 128 (1 thread). Its
`--attribution` run turns each saving off in turn (speed-up left without it): full last layer 1.8x,
caption work per pair 2.4x, no pair dedup 2.6x (23 % of the pairs are needed by both directions), no
trimming 3.0x, image tokens per pair 3.3x (an image has 17 tokens there). Sharing the image tokens is
the default because at base size an image has 577 tokens, whose cross-attention keys and values cost
several times the caption side of a pair; that, and the launch-bound per-query loop on a GPU, have
not been measured here.

Distributed: as ALBEF, every rank computes all features and the similarity matrix, the queries of
each direction are split into contiguous slices (ALBEF's `n // world_size + 1` step), each rank
re-ranks its own queries, and the score matrices are summed over ranks. Rows a rank does not own are
zero (not -100 as in ALBEF, where the sum shifts scores by a constant per row), so the all-reduced
matrices equal the single-process ones (up to the float round-off of different batch shapes).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from codis_lib.distributed import all_reduce_sum_, get_rank, get_world_size

SCORE_MODES = ("itm", "itm_plus_sim")
DEFAULT_RECALL_KS = (1, 5, 10)


# --------------------------------------------------------------------------------------------------
# Pure recall on score matrices
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------
@dataclass
class RetrievalFeatures:
    """Unimodal outputs of every image and caption of an evaluation set, computed once."""

    image_embeds: torch.Tensor  # (num_images, N, D) image encoder tokens, input of the fusion encoder
    image_feat: torch.Tensor  # (num_images, d) unit-norm projected CLS
    text_embeds: torch.Tensor  # (num_texts, L, D) text encoder tokens
    text_feat: torch.Tensor  # (num_texts, d) unit-norm projected CLS
    text_attention_mask: torch.Tensor  # (num_texts, L) 1 on real tokens, right padding

    @property
    def num_images(self) -> int:
        return self.image_feat.shape[0]

    @property
    def num_texts(self) -> int:
        return self.text_feat.shape[0]

    def similarity_i2t(self) -> torch.Tensor:
        """Return the contrastive similarity image_feat @ text_feat.T, shape (num_images, num_texts)."""
        return self.image_feat @ self.text_feat.t()


@torch.no_grad()
def compute_features(model, image_batches: Iterable[torch.Tensor], text_input_ids: torch.Tensor,
                     text_attention_mask: torch.Tensor, *, text_batch_size: int = 256,
                     device: torch.device | str | None = None) -> RetrievalFeatures:
    """Return the RetrievalFeatures of all images (given as batches, in dataset order) and all tokenised captions.

    text_input_ids, text_attention_mask: (num_texts, L), right-padded to a common L.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if text_input_ids.shape != text_attention_mask.shape or text_input_ids.dim() != 2:
        raise ValueError(f"text_input_ids {tuple(text_input_ids.shape)} and text_attention_mask "
                         f"{tuple(text_attention_mask.shape)} must be the same (num_texts, L) shape")
    if text_batch_size < 1:
        raise ValueError(f"text_batch_size must be >= 1, got {text_batch_size}")
    was_training = model.training
    model.eval()
    try:
        image_embeds, image_feat = [], []
        for images in image_batches:
            embeds, feat = model.encode_image(images.to(device))  # (B, N, D), (B, d)
            image_embeds.append(embeds)
            image_feat.append(feat)
        if not image_feat:
            raise ValueError("image_batches is empty: nothing to evaluate")
        text_embeds, text_feat = [], []
        for start in range(0, text_input_ids.shape[0], text_batch_size):
            ids = text_input_ids[start:start + text_batch_size].to(device)
            mask = text_attention_mask[start:start + text_batch_size].to(device)
            embeds, feat = model.encode_text(ids, mask)  # (B, L, D), (B, d)
            text_embeds.append(embeds)
            text_feat.append(feat)
    finally:
        model.train(was_training)
    return RetrievalFeatures(
        image_embeds=torch.cat(image_embeds), image_feat=torch.cat(image_feat),
        text_embeds=torch.cat(text_embeds), text_feat=torch.cat(text_feat),
        text_attention_mask=text_attention_mask.to(device))


# --------------------------------------------------------------------------------------------------
# Contrastive top k and ITM re-ranking
# --------------------------------------------------------------------------------------------------
def contrastive_topk(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (topk_sim, topk_index), both (Q, min(k, C)), highest first; ties keep the lower index first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, similarity.shape[1])
    sorted_sim, sorted_index = torch.sort(similarity, dim=1, descending=True, stable=True)
    return sorted_sim[:, :k], sorted_index[:, :k]


def query_slice(num_queries: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """Return the contiguous block of queries this rank re-ranks (ALBEF's split: step n // world + 1)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    step = num_queries // world_size + 1
    start = min(num_queries, rank * step)
    return slice(start, min(num_queries, start + step))


def _check_score_mode(score_mode: str) -> None:
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")


def _match_logit(model, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_attention_mask: torch.Tensor,
                 **fusion_options: bool) -> torch.Tensor:
    """Return the ITM match logit (column 1) of each (image, caption) pair, shape (P,)."""
    return model.itm_logits(image_embeds, text_embeds, text_attention_mask, **fusion_options)[:, 1]


def _is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Return True when every row is ones followed by zeros (so trimming trailing columns drops only padding)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


@torch.no_grad()
def itm_pair_scores(model, features: RetrievalFeatures, image_index: torch.Tensor, text_index: torch.Tensor,
                    pair_batch_size: int = 1024, trim_padding: bool = True,
                    share_image_tokens: bool = True, share_text_work: bool = True,
                    first_token_only: bool = True) -> torch.Tensor:
    """Return the ITM match logit of each (image_index[p], text_index[p]) pair, shape (P,).

    Pairs are sorted by decreasing caption length and cut into batches of at most `pair_batch_size`
    pairs of similar length, each trimmed to its longest caption (when the masks are right-padded).
    With `share_image_tokens` the pairs are first grouped by image and a fusion call gets that image's
    tokens once, as a (1, N, D) tensor that the cross-attention broadcasts over the captions: the
    cross-attention keys and values are then computed once per image instead of once per pair.
    With `share_text_work` the first fusion layer's self-attention, which sees the caption only, is
    computed once per caption (not once per pair; it holds one more (captions, L, D) tensor meanwhile).
    With `first_token_only` the last fusion layer runs at [CLS] only, the one position the ITM head
    reads. Every setting gives the same scores.
    """
    if pair_batch_size < 1:
        raise ValueError(f"pair_batch_size must be >= 1, got {pair_batch_size}")
    device = features.image_embeds.device
    image_index = image_index.to(device)
    text_index = text_index.to(device)
    scores = torch.empty(len(text_index), dtype=features.image_feat.dtype, device=device)
    if len(text_index) == 0:
        return scores
    lengths = features.text_attention_mask.sum(dim=1)[text_index]  # (P,)
    trim = trim_padding and _is_right_padded(features.text_attention_mask)
    order = torch.sort(lengths, descending=True, stable=True).indices  # longest captions first
    if share_image_tokens:
        order = order[torch.sort(image_index[order], stable=True).indices]  # by image, then by length
        starts_of_images = (torch.nonzero(torch.diff(image_index[order])).flatten() + 1).tolist()
        groups = torch.tensor_split(order, starts_of_images)
    else:
        groups = (order,)
    max_length = features.text_embeds.shape[1]
    text_states, text_row = features.text_embeds, text_index
    if share_text_work:  # the captions the pairs need, each through the image-free part once
        needed, text_row = torch.unique(text_index, return_inverse=True)
        text_states = torch.cat([model.fusion_text_states(features.text_embeds[chunk],
                                                          features.text_attention_mask[chunk])
                                 for chunk in torch.split(needed, pair_batch_size)])
    for group in groups:
        for batch in _length_batches(group, lengths, pair_batch_size, trim):
            texts = text_index[batch]
            length = max(1, int(lengths[batch[0]])) if trim else max_length  # batch[0] is its longest caption
            if share_image_tokens:
                image_tokens = features.image_embeds[image_index[batch[:1]]]  # (1, N, D), broadcast over B
            else:
                image_tokens = features.image_embeds[image_index[batch]]  # (B, N, D)
            scores[batch] = _match_logit(model, image_tokens, text_states[text_row[batch], :length],
                                         features.text_attention_mask[texts, :length],
                                         first_token_only=first_token_only, text_self_attended=share_text_work)
    return scores


# A batch is closed when the next caption is shorter than this fraction of the batch's longest one:
# padding is then at most 1/3 of a batch's tokens, while an image's few hundred pairs still go in a
# handful of calls (each call has a fixed cost, so batches of one length only would be slower).
_MIN_LENGTH_FRACTION = 0.75


def _length_batches(order: torch.Tensor, lengths: torch.Tensor, pair_batch_size: int, trim: bool) -> list[torch.Tensor]:
    """Return `order` (pair indices sorted by decreasing caption length) cut into fusion batches."""
    if not trim:
        return list(torch.split(order, pair_batch_size))
    sorted_lengths = lengths[order].tolist()
    batches, start = [], 0
    for position in range(1, len(order) + 1):
        if (position == len(order) or position - start == pair_batch_size
                or sorted_lengths[position] < _MIN_LENGTH_FRACTION * sorted_lengths[start]):
            batches.append(order[start:position])
            start = position
    return batches


@dataclass
class RerankResult:
    """Re-ranked score matrices (ALBEF's score_matrix_i2t / _t2i) and what it took to compute them."""

    scores_i2t: torch.Tensor  # (num_images, num_texts): ITM score in each image's top k, fill_value elsewhere
    scores_t2i: torch.Tensor  # (num_texts, num_images)
    k_i2t: int  # top k actually used per image query (k capped at num_texts)
    k_t2i: int
    pairs_requested: int  # (query, candidate) pairs of this rank, both directions
    pairs_scored: int  # distinct (image, caption) pairs sent through the fusion encoder on this rank
    seconds: float = 0.0


def _split_of_this_process(distributed: bool, query_split: tuple[int, int] | None) -> tuple[int, int, bool]:
    """Return (rank, world_size, all_reduce_afterwards) for a re-ranking call."""
    if query_split is not None:
        rank, world_size = query_split
        if not 0 <= rank < world_size:
            raise ValueError(f"query_split=(rank={rank}, world_size={world_size}): need 0 <= rank < world_size")
        return rank, world_size, False
    if distributed:
        return get_rank(), get_world_size(), True
    return 0, 1, False


def _fill_rows(num_rows: int, num_cols: int, owned: slice, fill_value: float, dtype, device) -> torch.Tensor:
    """Return a (num_rows, num_cols) matrix: fill_value in this rank's rows, 0 elsewhere (so a sum over ranks is exact)."""
    matrix = torch.zeros(num_rows, num_cols, dtype=dtype, device=device)
    matrix[owned] = fill_value
    return matrix


def _check_fill(scores: torch.Tensor, fill_value: float) -> None:
    if len(scores) and float(scores.min()) <= fill_value:
        raise ValueError(f"an ITM score ({float(scores.min()):.3g}) is <= fill_value ({fill_value}); "
                         "candidates outside the top k would tie with it: pass a lower fill_value")


@torch.no_grad()
def itm_rerank_batched(model, features: RetrievalFeatures, k: int, *, pair_batch_size: int = 1024,
                       score_mode: str = "itm", fill_value: float = -100.0, deduplicate: bool = True,
                       trim_padding: bool = True, share_image_tokens: bool = True, share_text_work: bool = True,
                       first_token_only: bool = True, distributed: bool = True,
                       query_split: tuple[int, int] | None = None) -> RerankResult:
    """Return both re-ranked score matrices, scoring many queries' (query, candidate) pairs per fusion batch.

    Same scores as `itm_rerank_one_query_at_a_time` (up to float round-off from different batch shapes).
    `distributed=True` splits queries over ranks and all-reduces the matrices (a no-op in one process).
    `query_split=(rank, world_size)` re-ranks only that rank's share of queries and returns it without
    any all-reduce (other rows are 0), so the shares of all ranks sum to the full matrices.
    """
    _check_score_mode(score_mode)
    start_time = time.perf_counter()
    was_training = model.training
    model.eval()
    num_images, num_texts = features.num_images, features.num_texts
    device = features.image_feat.device
    rank, world_size, all_reduce = _split_of_this_process(distributed, query_split)
    sims_i2t = features.similarity_i2t()  # (num_images, num_texts)
    images_owned = query_slice(num_images, rank, world_size)
    texts_owned = query_slice(num_texts, rank, world_size)
    topk_sim_i2t, topk_text = contrastive_topk(sims_i2t[images_owned], k)  # (Qi, k_i2t)
    topk_sim_t2i, topk_image = contrastive_topk(sims_i2t.t()[texts_owned], k)  # (Qt, k_t2i)
    query_images = torch.arange(num_images, device=device)[images_owned]
    query_texts = torch.arange(num_texts, device=device)[texts_owned]

    # every (image, caption) pair either direction needs, as flat index lists
    pair_image = torch.cat([query_images[:, None].expand_as(topk_text).reshape(-1), topk_image.reshape(-1)])
    pair_text = torch.cat([topk_text.reshape(-1), query_texts[:, None].expand_as(topk_image).reshape(-1)])
    if deduplicate:
        pair_key, inverse = torch.unique(pair_image * num_texts + pair_text, return_inverse=True)
        unique_image, unique_text = pair_key // num_texts, pair_key % num_texts
    else:
        inverse = torch.arange(len(pair_image), device=device)
        unique_image, unique_text = pair_image, pair_text
    try:
        unique_scores = itm_pair_scores(model, features, unique_image, unique_text, pair_batch_size, trim_padding,
                                        share_image_tokens, share_text_work, first_token_only)
    finally:
        model.train(was_training)
    pair_scores = unique_scores[inverse]
    _check_fill(pair_scores, fill_value)
    num_i2t = topk_text.numel()
    score_i2t = pair_scores[:num_i2t].view_as(topk_text)  # (Qi, k_i2t)
    score_t2i = pair_scores[num_i2t:].view_as(topk_image)  # (Qt, k_t2i)
    if score_mode == "itm_plus_sim":
        score_i2t, score_t2i = score_i2t + topk_sim_i2t, score_t2i + topk_sim_t2i

    scores_i2t = _fill_rows(num_images, num_texts, images_owned, fill_value, score_i2t.dtype, device)
    scores_i2t[images_owned].scatter_(1, topk_text, score_i2t)
    scores_t2i = _fill_rows(num_texts, num_images, texts_owned, fill_value, score_t2i.dtype, device)
    scores_t2i[texts_owned].scatter_(1, topk_image, score_t2i)
    if all_reduce:
        all_reduce_sum_(scores_i2t)
        all_reduce_sum_(scores_t2i)
    return RerankResult(scores_i2t=scores_i2t, scores_t2i=scores_t2i, k_i2t=topk_text.shape[1],
                        k_t2i=topk_image.shape[1], pairs_requested=len(pair_image),
                        pairs_scored=len(unique_image), seconds=time.perf_counter() - start_time)


@torch.no_grad()
def itm_rerank_one_query_at_a_time(model, features: RetrievalFeatures, k: int, *, score_mode: str = "itm",
                                   fill_value: float = -100.0, distributed: bool = True,
                                   query_split: tuple[int, int] | None = None) -> RerankResult:
    """Return both re-ranked score matrices computed as ALBEF's Retrieval.py does: one fusion batch of k pairs per query.

    The reference for `itm_rerank_batched` (tests, benchmarks/bench_rerank.py): no padding trimming,
    no sharing of pairs between the two directions or of work between pairs, and the whole fusion
    encoder on every token, as ALBEF's `itm_eval` runs it.
    """
    _check_score_mode(score_mode)
    start_time = time.perf_counter()
    was_training = model.training
    model.eval()
    num_images, num_texts = features.num_images, features.num_texts
    device = features.image_feat.device
    rank, world_size, all_reduce = _split_of_this_process(distributed, query_split)
    sims_i2t = features.similarity_i2t()
    images_owned = query_slice(num_images, rank, world_size)
    texts_owned = query_slice(num_texts, rank, world_size)
    dtype = features.image_feat.dtype
    scores_i2t = _fill_rows(num_images, num_texts, images_owned, fill_value, dtype, device)
    scores_t2i = _fill_rows(num_texts, num_images, texts_owned, fill_value, dtype, device)
    k_i2t = min(k, num_texts)
    k_t2i = min(k, num_images)
    try:
        for image in range(images_owned.start, images_owned.stop):
            topk_sim, topk_text = contrastive_topk(sims_i2t[image:image + 1], k)  # (1, k)
            topk_sim, topk_text = topk_sim[0], topk_text[0]
            score = _match_logit(model, features.image_embeds[image].expand(len(topk_text), -1, -1),
                                 features.text_embeds[topk_text], features.text_attention_mask[topk_text],
                                 first_token_only=False)
            _check_fill(score, fill_value)
            scores_i2t[image, topk_text] = score + topk_sim if score_mode == "itm_plus_sim" else score
        for text in range(texts_owned.start, texts_owned.stop):
            topk_sim, topk_image = contrastive_topk(sims_i2t[:, text][None], k)
            topk_sim, topk_image = topk_sim[0], topk_image[0]
            score = _match_logit(model, features.image_embeds[topk_image],
                                 features.text_embeds[text].expand(len(topk_image), -1, -1),
                                 features.text_attention_mask[text].expand(len(topk_image), -1),
                                 first_token_only=False)
            _check_fill(score, fill_value)
            scores_t2i[text, topk_image] = score + topk_sim if score_mode == "itm_plus_sim" else score
    finally:
        model.train(was_training)
    if all_reduce:
        all_reduce_sum_(scores_i2t)
        all_reduce_sum_(scores_t2i)
    num_pairs = (images_owned.stop - images_owned.start) * k_i2t + (texts_owned.stop - texts_owned.start) * k_t2i
    return RerankResult(scores_i2t=scores_i2t, scores_t2i=scores_t2i, k_i2t=k_i2t, k_t2i=k_t2i,
                        pairs_requested=num_pairs, pairs_scored=num_pairs,
                        seconds=time.perf_counter() - start_time)


# --------------------------------------------------------------------------------------------------
# The whole protocol
# --------------------------------------------------------------------------------------------------
@dataclass
class RetrievalEvaluation:
    """Metrics of one evaluation (contrastive ranking, and ITM re-ranking when run) plus the score matrices."""

    metrics: dict  # {"itc": ALBEF metric dict, "itm": ALBEF metric dict or None}
    sims_i2t: torch.Tensor  # (num_images, num_texts) contrastive similarity
    rerank: RerankResult | None
    k: int
    seconds: dict
    features: RetrievalFeatures | None = None  # kept by evaluate_retrieval for pictures and codes

    @property
    def headline(self) -> dict:
        """Return the metric dict the paper reports: ITM re-ranked when available, contrastive otherwise."""
        return self.metrics["itm"] if self.metrics.get("itm") is not None else self.metrics["itc"]

    def to_dict(self) -> dict:
        """Return a JSON-ready summary (metrics, k, pair counts, timings; no matrices)."""
        summary = {"metrics": self.metrics, "headline": self.headline, "k": self.k, "seconds": self.seconds,
                   "num_images": int(self.sims_i2t.shape[0]), "num_texts": int(self.sims_i2t.shape[1])}
        if self.rerank is not None:
            summary.update(pairs_requested=self.rerank.pairs_requested, pairs_scored=self.rerank.pairs_scored)
        return summary


@torch.no_grad()
def evaluate_features(model, features: RetrievalFeatures, txt2img: Sequence[int],
                      img2txt: Sequence[Sequence[int]], *, k: int = 128, rerank: bool = True,
                      pair_batch_size: int = 1024, score_mode: str = "itm", ks: Sequence[int] = DEFAULT_RECALL_KS,
                      distributed: bool = True) -> RetrievalEvaluation:
    """Return the RetrievalEvaluation of precomputed features: contrastive metrics, and ITM re-ranked ones if `rerank`."""
    check_retrieval_mapping(txt2img, img2txt)
    if (features.num_images, features.num_texts) != (len(img2txt), len(txt2img)):
        raise ValueError(f"features hold {features.num_images} images and {features.num_texts} captions but "
                         f"img2txt has {len(img2txt)} images and txt2img {len(txt2img)} captions")
    sims_i2t = features.similarity_i2t()
    metrics = {"itc": retrieval_metrics(sims_i2t, sims_i2t.t(), txt2img, img2txt, ks), "itm": None}
    seconds = {}
    rerank_result = None
    if rerank:
        rerank_result = itm_rerank_batched(model, features, k, pair_batch_size=pair_batch_size,
                                           score_mode=score_mode, distributed=distributed)
        seconds["rerank"] = rerank_result.seconds
        metrics["itm"] = retrieval_metrics(rerank_result.scores_i2t, rerank_result.scores_t2i, txt2img, img2txt, ks)
    return RetrievalEvaluation(metrics=metrics, sims_i2t=sims_i2t.cpu(), rerank=rerank_result,
                               k=min(k, features.num_texts, features.num_images) if rerank else 0,
                               seconds=seconds)


def model_has_trained_itm(model) -> bool:
    """Return True when the model's mode trains the ITM head (albef, codis); clip mode leaves it random."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "active_losses"):
        return True
    return bool(config.active_losses().get("itm", False))


@torch.no_grad()
def dataset_features(model, dataset, tokenizer, *, image_batch_size: int = 64, text_batch_size: int = 256,
                     max_length: int = 30, device: torch.device | str | None = None,
                     num_workers: int = 0) -> RetrievalFeatures:
    """Return the RetrievalFeatures of a RetrievalEvalDataset (images in dataset order, all of `dataset.texts`).

    Captions are tokenised once with ALBEF's convention ([CLS] tokens, truncated to `max_length`),
    padded to the longest caption of the whole set so that every text shares one length L.
    """
    from torch.utils.data import DataLoader

    from codis_lib.data.collate import collate_eval_images, tokenize_captions

    for attribute in ("texts", "txt2img", "img2txt"):
        if not hasattr(dataset, attribute):
            raise TypeError(f"dataset {type(dataset).__name__} has no `{attribute}`: expected a "
                            "codis_lib.data.datasets.RetrievalEvalDataset (ALBEF's re_eval_dataset)")
    if image_batch_size < 1:
        raise ValueError(f"image_batch_size must be >= 1, got {image_batch_size}")
    tokens = tokenize_captions(tokenizer, dataset.texts, max_length)  # (num_texts, L) each
    loader = DataLoader(dataset, batch_size=image_batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_eval_images)
    return compute_features(model, (batch["image"] for batch in loader), tokens["input_ids"],
                            tokens["attention_mask"], text_batch_size=text_batch_size, device=device)


@torch.no_grad()
def evaluate_retrieval(model, dataset, tokenizer, *, k: int = 128, rerank: bool | None = None,
                       image_batch_size: int = 64, text_batch_size: int = 256, pair_batch_size: int = 1024,
                       score_mode: str = "itm", ks: Sequence[int] = DEFAULT_RECALL_KS,
                       device: torch.device | str | None = None, distributed: bool = True,
                       num_workers: int = 0) -> RetrievalEvaluation:
    """Return the RetrievalEvaluation of `model` on a RetrievalEvalDataset with ALBEF's protocol.

    rerank=None re-ranks with the ITM head only when the model's mode trains it (not in clip mode,
    whose ITM head is random); the contrastive metrics are always reported under "itc".
    """
    start = time.perf_counter()
    features = dataset_features(model, dataset, tokenizer, image_batch_size=image_batch_size,
                                text_batch_size=text_batch_size, device=device, num_workers=num_workers)
    feature_seconds = time.perf_counter() - start
    if rerank is None:
        rerank = model_has_trained_itm(model)
    evaluation = evaluate_features(model, features, dataset.txt2img, dataset.img2txt, k=k, rerank=rerank,
                                   pair_batch_size=pair_batch_size, score_mode=score_mode, ks=ks,
                                   distributed=distributed)
    evaluation.seconds["features"] = feature_seconds
    evaluation.seconds["total"] = time.perf_counter() - start
    evaluation.features = features
    return evaluation
