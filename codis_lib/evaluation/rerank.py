"""Contrastive top k and ITM re-ranking of ALBEF's retrieval protocol, batched over many queries.

For every query (an image for text retrieval, a caption for image retrieval) the top k candidates
of the contrastive similarity are re-scored with the ITM match logit through the fusion encoder;
every candidate outside the top k gets `fill_value` (-100, as ALBEF). A stable descending sort picks
the top k: among equal similarities the lower candidate index comes first (torch.topk gives no
such guarantee).

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

import time
from dataclasses import dataclass

import torch

from codis_lib.distributed import all_reduce_sum_, get_rank, get_world_size
from codis_lib.evaluation.features import RetrievalFeatures

SCORE_MODES = ("itm", "itm_plus_sim")


def contrastive_topk(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (topk_sim, topk_index), both (Q, min(k, C)), highest first; ties keep the lower index first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, similarity.shape[1])
    sorted_sim, sorted_index = torch.sort(similarity, dim=1, descending=True, stable=True)
    return sorted_sim[:, :k], sorted_index[:, :k]


def rerank_at_depth(similarity: torch.Tensor, scores: torch.Tensor, k: int, fill_value: float = -100.0) -> torch.Tensor:
    """Return re-ranked scores at depth k from `scores` re-ranked at a depth >= k over the same `similarity`.

    The top k of a query is a prefix of its top K (`contrastive_topk` sorts stably), so keeping each
    query's first k cells and filling the rest with `fill_value` equals re-ranking at k directly, with no
    fusion pass: one re-ranking at the largest depth gives the recall at every smaller one.
    """
    _, index = contrastive_topk(similarity, k)  # (Q, min(k, C))
    kept = scores.gather(1, index)
    if len(kept) and float(kept.min()) <= fill_value:
        raise ValueError(f"rerank_at_depth: a top-{k} cell holds fill_value ({fill_value}): `scores` were re-ranked "
                         "at a depth below k, or for another similarity")
    return torch.full_like(scores, fill_value).scatter_(1, index, kept)


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


@dataclass
class _RerankStart:
    """What both re-ranking loops set up before scoring: the clock, the model's mode, this rank's queries."""

    start_time: float
    was_training: bool  # the model's mode before the call, restored after scoring
    all_reduce: bool  # sum the score matrices over ranks afterwards
    sims_i2t: torch.Tensor  # (num_images, num_texts) contrastive similarity
    images_owned: slice  # the image queries this rank re-ranks
    texts_owned: slice  # the caption queries this rank re-ranks


def _start_rerank(model, features: RetrievalFeatures, score_mode: str, distributed: bool,
                  query_split: tuple[int, int] | None) -> _RerankStart:
    """Check score_mode, start the clock, put the model in eval mode and return this rank's share of queries."""
    _check_score_mode(score_mode)
    start_time = time.perf_counter()
    was_training = model.training
    model.eval()
    rank, world_size, all_reduce = _split_of_this_process(distributed, query_split)
    sims_i2t = features.similarity_i2t()
    return _RerankStart(start_time=start_time, was_training=was_training, all_reduce=all_reduce, sims_i2t=sims_i2t,
                        images_owned=query_slice(features.num_images, rank, world_size),
                        texts_owned=query_slice(features.num_texts, rank, world_size))


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
    start = _start_rerank(model, features, score_mode, distributed, query_split)
    sims_i2t, images_owned, texts_owned = start.sims_i2t, start.images_owned, start.texts_owned
    num_images, num_texts = features.num_images, features.num_texts
    device = features.image_feat.device
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
        model.train(start.was_training)
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
    if start.all_reduce:
        all_reduce_sum_(scores_i2t)
        all_reduce_sum_(scores_t2i)
    return RerankResult(scores_i2t=scores_i2t, scores_t2i=scores_t2i, k_i2t=topk_text.shape[1],
                        k_t2i=topk_image.shape[1], pairs_requested=len(pair_image),
                        pairs_scored=len(unique_image), seconds=time.perf_counter() - start.start_time)


@torch.no_grad()
def itm_rerank_one_query_at_a_time(model, features: RetrievalFeatures, k: int, *, score_mode: str = "itm",
                                   fill_value: float = -100.0, distributed: bool = True,
                                   query_split: tuple[int, int] | None = None) -> RerankResult:
    """Return both re-ranked score matrices computed as ALBEF's Retrieval.py does: one fusion batch of k pairs per query.

    The reference for `itm_rerank_batched` (tests, benchmarks/bench_rerank.py): no padding trimming,
    no sharing of pairs between the two directions or of work between pairs, and the whole fusion
    encoder on every token, as ALBEF's `itm_eval` runs it.
    """
    start = _start_rerank(model, features, score_mode, distributed, query_split)
    sims_i2t, images_owned, texts_owned = start.sims_i2t, start.images_owned, start.texts_owned
    num_images, num_texts = features.num_images, features.num_texts
    device = features.image_feat.device
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
        model.train(start.was_training)
    if start.all_reduce:
        all_reduce_sum_(scores_i2t)
        all_reduce_sum_(scores_t2i)
    num_pairs = (images_owned.stop - images_owned.start) * k_i2t + (texts_owned.stop - texts_owned.start) * k_t2i
    return RerankResult(scores_i2t=scores_i2t, scores_t2i=scores_t2i, k_i2t=k_i2t, k_t2i=k_t2i,
                        pairs_requested=num_pairs, pairs_scored=num_pairs,
                        seconds=time.perf_counter() - start.start_time)
