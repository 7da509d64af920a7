"""Image-text retrieval evaluation with ALBEF's protocol (contrastive ranking, ITM re-ranking, R@K)."""
from codis_lib.evaluation.retrieval import (
    RetrievalFeatures,
    compute_features,
    contrastive_topk,
    dataset_features,
    evaluate_features,
    evaluate_retrieval,
    itm_rerank_batched,
    itm_rerank_one_query_at_a_time,
    ranks_of_best_match,
    recall_from_ranks,
    rerank_at_depth,
    retrieval_metrics,
)

__all__ = [
    "RetrievalFeatures",
    "compute_features",
    "contrastive_topk",
    "dataset_features",
    "evaluate_features",
    "evaluate_retrieval",
    "itm_rerank_batched",
    "itm_rerank_one_query_at_a_time",
    "ranks_of_best_match",
    "recall_from_ranks",
    "rerank_at_depth",
    "retrieval_metrics",
]
