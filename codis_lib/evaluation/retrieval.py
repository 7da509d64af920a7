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

Ties are deterministic: the top k is a stable sort, recall is pessimistic about ties (see
codis_lib/evaluation/recall.py). The steps live in three modules, re-exported here:
- codis_lib/evaluation/features.py: `RetrievalFeatures`, `compute_features`, `dataset_features`;
- codis_lib/evaluation/recall.py: `retrieval_metrics`, `ranks_of_best_match`, `recall_from_ranks`;
- codis_lib/evaluation/rerank.py: `contrastive_topk`, `itm_rerank_batched` (the default) and ALBEF's
  one-query-at-a-time loop `itm_rerank_one_query_at_a_time` (the reference), with how the batched
  re-ranking saves work and how queries are split over ranks.
This module runs the whole protocol (`evaluate_retrieval`, `evaluate_features`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from codis_lib.evaluation.features import RetrievalFeatures, compute_features, dataset_features
from codis_lib.evaluation.recall import (
    DEFAULT_RECALL_KS,
    check_retrieval_mapping,
    ranks_of_best_match,
    recall_from_ranks,
    retrieval_metrics,
)
from codis_lib.evaluation.rerank import (
    SCORE_MODES,
    RerankResult,
    contrastive_topk,
    itm_pair_scores,
    itm_rerank_batched,
    itm_rerank_one_query_at_a_time,
    query_slice,
    rerank_at_depth,
)

__all__ = [  # the names importers use from here, wherever they are defined
    "DEFAULT_RECALL_KS", "SCORE_MODES", "RerankResult", "RetrievalEvaluation", "RetrievalFeatures",
    "check_retrieval_mapping", "compute_features", "contrastive_topk", "dataset_features", "evaluate_features",
    "evaluate_retrieval", "itm_pair_scores", "itm_rerank_batched", "itm_rerank_one_query_at_a_time",
    "model_has_trained_itm", "query_slice", "ranks_of_best_match", "rerank_at_depth", "recall_from_ranks", "retrieval_metrics",
]


@dataclass
class RetrievalEvaluation:
    """Metrics of one evaluation (contrastive ranking, and ITM re-ranking when run) plus the score matrices."""

    metrics: dict  # {"itc": ALBEF metric dict, "itm": ALBEF metric dict or None}
    sims_i2t: torch.Tensor  # (num_images, num_texts) contrastive similarity
    rerank: RerankResult | None
    k: int  # the most candidates a query was re-ranked over: max of the two below (0: no re-ranking)
    seconds: dict
    features: RetrievalFeatures | None = None  # kept by evaluate_retrieval for pictures and codes
    # k is clamped per direction to the candidates there are: captions per image query (TR), images per
    # caption query (IR); both 0 without re-ranking. k_requested: the k asked for.
    k_text_retrieval: int = 0
    k_image_retrieval: int = 0
    k_requested: int = 0

    @property
    def headline(self) -> dict:
        """Return the metric dict the paper reports: ITM re-ranked when available, contrastive otherwise."""
        return self.metrics["itm"] if self.metrics.get("itm") is not None else self.metrics["itc"]

    def to_dict(self) -> dict:
        """Return a JSON-ready summary (metrics, k, pair counts, timings; no matrices)."""
        summary = {"metrics": self.metrics, "headline": self.headline, "k": self.k,
                   "k_text_retrieval": self.k_text_retrieval, "k_image_retrieval": self.k_image_retrieval,
                   "k_requested": self.k_requested, "seconds": self.seconds,
                   "num_images": int(self.sims_i2t.shape[0]), "num_texts": int(self.sims_i2t.shape[1])}
        if self.rerank is not None:
            summary.update(pairs_requested=self.rerank.pairs_requested, pairs_scored=self.rerank.pairs_scored)
        return summary


@torch.no_grad()
def evaluate_features(model, features: RetrievalFeatures, txt2img: Sequence[int],
                      img2txt: Sequence[Sequence[int]], *, k: int = 128, rerank: bool = True,
                      pair_batch_size: int = 1024, score_mode: str = "itm", ks: Sequence[int] = DEFAULT_RECALL_KS,
                      distributed: bool = True) -> RetrievalEvaluation:
    """Return the RetrievalEvaluation of precomputed features: contrastive metrics, and ITM re-ranked ones if `rerank`.

    Each image query re-ranks its top min(k, captions) captions and each caption query its top
    min(k, images) images; the evaluation records both (`k_text_retrieval`, `k_image_retrieval`).
    """
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
    k_tr, k_ir = (min(k, features.num_texts), min(k, features.num_images)) if rerank else (0, 0)
    return RetrievalEvaluation(metrics=metrics, sims_i2t=sims_i2t.cpu(), rerank=rerank_result, k=max(k_tr, k_ir),
                               seconds=seconds, k_text_retrieval=k_tr, k_image_retrieval=k_ir,
                               k_requested=k if rerank else 0)


def model_has_trained_itm(model) -> bool:
    """Return True when the model's mode trains the ITM head (albef, codis); clip mode leaves it random."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "active_losses"):
        return True
    return bool(config.active_losses().get("itm", False))


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
