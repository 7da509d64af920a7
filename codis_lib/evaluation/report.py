"""Retrieval of a run's model on a held-out split, as a JSON-ready report and as the poster's table.

    >>> dataset = retrieval_split_dataset(run_config, "test")       # the run's own val/test records
    >>> report = retrieval_report(model, tokenizer, dataset, k=16)  # ALBEF's protocol, a plain dict
    >>> print(format_retrieval_table(report, title="zero-shot retrieval"))

The trainer calls these at the end of a run (and every `train.eval.every_epochs`); `codis-eval`
(`codis_lib.evaluation.cli`) prints the same table for any checkpoint, optionally under the paper's rows.
"""
from __future__ import annotations

from pathlib import Path

import torch

from codis_lib.config import ConfigError
from codis_lib.evaluation.paper import format_poster_table, paper_rows
from codis_lib.run_config import RunConfig

__all__ = ["RANKING_NAMES", "retrieval_split_dataset", "retrieval_report", "format_evaluation_table",
           "format_retrieval_table"]

RANKING_NAMES = {"itm": "ITM re-ranked", "itc": "contrastive only"}


def retrieval_split_dataset(config: RunConfig, split: str):
    """Return the RetrievalEvalDataset of `split` ("val" | "test") for this run's data."""
    from codis_lib.data.datasets import RetrievalEvalDataset

    data = config.data
    if data.dataset == "emoji":
        path = Path(data.root) / f"{split}.json"
        image_root = None
    else:
        path = data.val_file if split == "val" else data.test_file
        if path is None:
            raise ConfigError(f"data.{split}_file: needed to evaluate on the {split} split")
        image_root = data.image_root or None
    return RetrievalEvalDataset(path, image_root, image_size=config.model.vision.image_size,
                                cache=data.cache_images, check_images="exists")


@torch.no_grad()
def retrieval_report(model, tokenizer, dataset, *, k: int, batch_size: int = 64, pair_batch_size: int = 256,
                     device: torch.device | None = None) -> dict:
    """Return ALBEF-protocol retrieval results on a RetrievalEvalDataset (`RetrievalEvaluation.to_dict()`).

    Uses `codis_lib.evaluation.retrieval.evaluate_retrieval`: every rank computes all features, ITM
    re-ranking of each query's top k splits the queries over ranks and sums the scores. The model is
    switched to eval mode for the evaluation and back to its previous mode afterwards.
    """
    from codis_lib.evaluation.retrieval import evaluate_retrieval

    was_training = model.training
    model.eval()
    try:
        evaluation = evaluate_retrieval(model, dataset, tokenizer, k=k, image_batch_size=batch_size,
                                        text_batch_size=max(batch_size, 256), pair_batch_size=pair_batch_size,
                                        device=device or next(model.parameters()).device)
    finally:
        model.train(was_training)
    return evaluation.to_dict()


def format_evaluation_table(result: dict, *, title: str = "", paper: str | None = None,
                            setting: str = "zero-shot") -> str:
    """Return the poster-layout table of a retrieval result dict, optionally under the paper's rows.

    result: `retrieval_report(...)`, `run_evaluation(...)` or `RetrievalEvaluation.to_dict()`.
    paper: "coco" | "flickr" adds the poster's ALBEF 4M and CODIS rows of that dataset and `setting`.
    """
    rows = dict(paper_rows(setting, paper)) if paper else {}
    for ranking in ("itc", "itm"):
        metrics = result["metrics"].get(ranking)
        if metrics is not None:
            suffix = f" (k={result['k']})" if ranking == "itm" else ""
            rows[f"this run, {RANKING_NAMES[ranking]}{suffix}"] = metrics
    footer = (f"{result['num_images']} images, {result['num_texts']} captions; TR = image -> text (an image counts "
              f"if any of its captions is within K), IR = text -> image; recall in %.")
    return format_poster_table(rows, title=title) + "\n" + footer


def format_retrieval_table(evaluation: dict, title: str = "") -> str:
    """Return the poster-layout table (TR/IR R@1/5/10, contrastive and ITM re-ranked rows) of an evaluation."""
    return format_evaluation_table(evaluation, title=title)
