"""Retrieval of a run's model on its held-out splits, as JSON-ready reports and as the poster's table.

    >>> dataset = retrieval_split_dataset(run_config, "new_drawings")   # one of the run's evaluation splits
    >>> report = retrieval_report(model, tokenizer, dataset, k=16)      # ALBEF's protocol, a plain dict
    >>> print(format_retrieval_table(report, title=split_title(run_config, "new_drawings")))

The emoji corpus has three evaluation splits (codis_lib.data.emoji_split_file): `new_drawings` (new
drawings of training concepts, like the paper's COCO test images after pretraining on COCO train),
`test` and `val` (concepts never seen in training); ALBEF JSON data has `val` and `test`
(data.val_file, data.test_file). The trainer evaluates every split of `train.eval.splits` at the end
of a run (and every `train.eval.every_epochs`); `codis-eval` (`codis_lib.evaluation.cli`) prints the
same tables for any checkpoint, optionally under the paper's rows.
"""
from __future__ import annotations

from pathlib import Path

import torch

from codis_lib.evaluation.paper import format_poster_table, paper_rows
from codis_lib.run_config import ALBEF_JSON_EVAL_FILES, RunConfig, eval_split_errors
from codis_lib.typed_config import ConfigError

__all__ = ["RANKING_NAMES", "EMOJI_SPLIT_DESCRIPTIONS", "retrieval_split_file", "retrieval_split_dataset",
           "available_eval_splits",
           "split_description", "split_title", "retrieval_report", "format_evaluation_table",
           "format_retrieval_table"]

RANKING_NAMES = {"itm": "ITM re-ranked", "itc": "contrastive only"}
EMOJI_SPLIT_DESCRIPTIONS = {"new_drawings": "new drawings of training concepts",
                            "test": "concepts never seen in training",
                            "val": "concepts never seen in training",
                            "new_style": "training concepts in an art style never trained on",
                            "new_style_test": "unseen concepts in an art style never trained on"}


def retrieval_split_file(config: RunConfig, split: str) -> Path:
    """Return the retrieval JSON of `split` for this run's data: `emoji_split_file` or data.val_file / data.test_file.

    Raises ConfigError for a name the data has no split of, and (emoji) FileNotFoundError saying how to
    rebuild when the corpus folder lacks the split's file.
    """
    from codis_lib.data.emoji_corpus import emoji_split_file

    problems = eval_split_errors(config.data, [split], "split")
    if problems:
        raise ConfigError(problems[0])
    if config.data.dataset == "emoji":
        return emoji_split_file(config.data.root, split)
    return Path(getattr(config.data, ALBEF_JSON_EVAL_FILES[split]))


def available_eval_splits(config: RunConfig, splits, log=None) -> list[str]:
    """Return `splits` less the held-out-style ones the corpus cannot have (no Noto font), saying so in one line each.

    Any other missing split file raises (FileNotFoundError, saying how to rebuild), before training starts.
    """
    from codis_lib.data.emoji_concepts import STYLE_SPLITS

    found = []
    for split in splits:
        try:
            retrieval_split_file(config, split)
        except FileNotFoundError as error:
            if config.data.dataset != "emoji" or split not in STYLE_SPLITS:
                raise
            if log:
                log(f"{split} split skipped: {error}")
            continue
        found.append(split)
    return found


def retrieval_split_dataset(config: RunConfig, split: str):
    """Return the RetrievalEvalDataset of `split` for this run's data (`retrieval_split_file` says which file)."""
    from codis_lib.data.datasets import RetrievalEvalDataset

    data = config.data
    image_root = None if data.dataset == "emoji" else (data.image_root or None)
    return RetrievalEvalDataset(retrieval_split_file(config, split), image_root,
                                image_size=config.model.vision.image_size, cache=data.cache_images,
                                check_images="exists")


def split_description(config: RunConfig, split: str) -> str:
    """Return what `split` holds, in words: for emoji data what it tests, for ALBEF JSON data its file name."""
    if config.data.dataset == "emoji":
        return EMOJI_SPLIT_DESCRIPTIONS.get(split, split)
    file = getattr(config.data, ALBEF_JSON_EVAL_FILES.get(split, ""), None)
    return Path(file).name if file else f"no data.{split}_file"


def split_title(config: RunConfig, split: str) -> str:
    """Return a table title naming the split and what it is, for a pretraining (zero-shot) or fine-tuning run."""
    where = f"the {split} split ({split_description(config, split)})"
    if config.train.task == "pretrain":
        return f"Zero-shot retrieval on {where}"
    return f"Retrieval on {where} after fine-tuning"


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
            suffix = f" ({rerank_depth(result)})" if ranking == "itm" else ""
            rows[f"this run, {RANKING_NAMES[ranking]}{suffix}"] = metrics
    footer = (f"{result['num_images']} images, {result['num_texts']} captions; TR = image -> text (an image counts "
              f"if any of its captions is within K), IR = text -> image; recall in %.")
    if result.get("merged_duplicates"):
        footer += f" {result['merged_duplicates']} duplicate image record(s) merged into their first record."
    return format_poster_table(rows, title=title) + "\n" + footer


def rerank_depth(result: dict) -> str:
    """Return the k the ITM re-ranking used, as the table shows it: "k=20", or "k=70 TR, 20 IR" when clamped apart.

    A result written before the per-direction keys existed shows its "k".
    """
    k_tr, k_ir = result.get("k_text_retrieval"), result.get("k_image_retrieval")
    if k_tr is None or k_ir is None or k_tr == k_ir:
        return f"k={result['k'] if k_tr is None else k_tr}"
    return f"k={k_tr} TR, {k_ir} IR"


def format_retrieval_table(evaluation: dict, title: str = "") -> str:
    """Return the poster-layout table (TR/IR R@1/5/10, contrastive and ITM re-ranked rows) of an evaluation."""
    return format_evaluation_table(evaluation, title=title)
