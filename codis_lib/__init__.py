"""CODIS: multimodal alignment with a representation codebook, on top of ALBEF.

What a notebook needs, importable from here (`from codis_lib import build_model, pretrain_or_load`):

- the notebooks' plumbing (codis_lib.course): start_notebook (folders, seed, threads at a size),
  main_model_source and load_main_model (the main checkpoint, or a short pretraining at this size),
  write_metrics (the metrics.json their tests read);
- build: ModelConfig, build_model, RunConfig, load_run_config, build_emoji_corpus, emoji_split_file,
  load_tokenizer, the datasets (PretrainDataset, RetrievalTrainDataset, RetrievalEvalDataset),
  ImageTextCollator, tokenize_captions and mask_tokens;
- load: load_trained_model, load_or_train (also under its earlier name pretrain_or_load), load_checkpoint,
  load_albef_model, load_albef_state_dict, model_config_from_albef, export_albef_checkpoint;
- train: run_training (`codis_lib.train.engine.train`; a function named `train` cannot live here, since
  importing the subpackage `codis_lib.train` sets that attribute), TrainResult, NonFiniteLossError,
  the schedules (lr_at_step, alpha_at_step, effective_warmup_steps), the per-sample seeds and teacher
  views of a batch (sample_seeds, teacher_batch_inputs), the logs (read_jsonl; their figures smooth,
  plot_loss_curves, plot_series, from codis_lib.viz) and the full-recipe launcher (launch_requirements,
  torchrun_command, run_command, plan_run; notebook 07's run: launch_run, LiveProgress, latest_step, finished_run,
  read_evaluations, recall_chance, format_recall_with_chance, format_main_run_comparison);
- evaluate: evaluate_retrieval and its parts (dataset_features, evaluate_features, the ITM re-rankers,
  ranks_of_best_match, retrieval_metrics), retrieval_split_dataset, retrieval_split_file, split_title,
  EMOJI_SPLIT_DESCRIPTIONS, retrieval_report, run_evaluation, format_retrieval_table,
  format_evaluation_table, paper_rows, format_poster_markdown, your own words against a gallery
  (rank_images_for_text, text_image_similarity, gallery_image_features, gallery_names, answering_images: the everyday-word
  benchmark's pieces, notebook 05's `query`) and word-level Grad-CAM on the fusion
  encoder (gradcam, gradcam_by_layer, GradCAM, content_words, image_grid, normalise_map, blank_canvas, paste_scaled);
- optimal transport and the codebook: sinkhorn, sinkhorn_with_info, ot_cost, sinkhorn_reference (SwAV's
  loop, the readable reference), Codebook, transport_assignments (T_i2p, T_t2p), loss_code (L_code),
  loss_ot (L_ot), codebook_losses, codebook_usage; every poster term has its file in `codis_lib.objectives`;
- the fusion terms' pieces: hard_negative_similarities, hard_negative_weights, sample_hard_negatives,
  sample_generator, image_text_matching, mlm_loss_from_logits;
- constants: CLIP_MEAN, CLIP_STD.

Every name is imported on first use (PEP 562), so `import codis_lib` stays light (no torch).
Figures are in `codis_lib.viz`. The package is layered, each part importing only the ones before it:
typed_config, config, run_config, metrics_log and distributed; data; ot; objectives; codebook; model;
checkpoint; evaluation; viz; train; course (tests/test_layout.py holds it to that).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    # build
    "ModelConfig": ("codis_lib.config", "ModelConfig"),
    "ConfigError": ("codis_lib.typed_config", "ConfigError"),
    "build_model": ("codis_lib.model", "build_model"),
    "RunConfig": ("codis_lib.run_config", "RunConfig"),
    "load_run_config": ("codis_lib.run_config", "load_run_config"),
    "build_emoji_corpus": ("codis_lib.data.emoji_corpus", "build_emoji_corpus"),
    "load_tokenizer": ("codis_lib.data.tokenizer", "load_tokenizer"),
    "PretrainDataset": ("codis_lib.data.datasets", "PretrainDataset"),
    "RetrievalTrainDataset": ("codis_lib.data.datasets", "RetrievalTrainDataset"),
    "RetrievalEvalDataset": ("codis_lib.data.datasets", "RetrievalEvalDataset"),
    "ImageTextCollator": ("codis_lib.data.collate", "ImageTextCollator"),
    "tokenize_captions": ("codis_lib.data.collate", "tokenize_captions"),
    "emoji_split_file": ("codis_lib.data.emoji_manifest", "emoji_split_file"),
    "mask_tokens": ("codis_lib.model.masking", "mask_tokens"),
    # load
    "TrainedModel": ("codis_lib.evaluation.models", "TrainedModel"),
    "load_trained_model": ("codis_lib.evaluation.models", "load_trained_model"),
    "load_or_train": ("codis_lib.train.load_or_train", "load_or_train"),
    "pretrain_or_load": ("codis_lib.train.load_or_train", "load_or_train"),  # its earlier name, kept for now
    "load_checkpoint": ("codis_lib.checkpoint", "load_checkpoint"),
    "load_albef_model": ("codis_lib.evaluation.albef_models", "load_albef_model"),
    "export_albef_checkpoint": ("codis_lib.evaluation.albef_models", "export_albef_checkpoint"),
    "load_albef_state_dict": ("codis_lib.model.albef_checkpoint", "load_albef_state_dict"),
    "model_config_from_albef": ("codis_lib.model.albef_checkpoint", "model_config_from_albef"),
    # train
    "run_training": ("codis_lib.train.engine", "train"),
    "TrainResult": ("codis_lib.train.engine", "TrainResult"),
    "NonFiniteLossError": ("codis_lib.train.engine", "NonFiniteLossError"),
    "lr_at_step": ("codis_lib.train.schedule", "lr_at_step"),
    "alpha_at_step": ("codis_lib.train.schedule", "alpha_at_step"),
    "effective_warmup_steps": ("codis_lib.train.schedule", "effective_warmup_steps"),
    "launch_requirements": ("codis_lib.train.launch", "launch_requirements"),
    "torchrun_command": ("codis_lib.train.launch", "torchrun_command"),
    "run_command": ("codis_lib.train.launch", "run_command"),
    "plan_run": ("codis_lib.train.launch", "plan_run"),
    "RunPlan": ("codis_lib.train.launch", "RunPlan"),
    "latest_step": ("codis_lib.train.full_run", "latest_step"),
    "finished_run": ("codis_lib.train.full_run", "finished_run"),
    "LiveProgress": ("codis_lib.train.full_run", "LiveProgress"),
    "launch_run": ("codis_lib.train.full_run", "launch_run"),
    "LaunchOutcome": ("codis_lib.train.full_run", "LaunchOutcome"),
    "read_evaluations": ("codis_lib.train.full_run", "read_evaluations"),
    "recall_chance": ("codis_lib.train.full_run", "recall_chance"),
    "format_recall_with_chance": ("codis_lib.train.full_run", "format_recall_with_chance"),
    "compare_with_main_run": ("codis_lib.train.full_run", "compare_with_main_run"),
    "format_main_run_comparison": ("codis_lib.train.full_run", "format_main_run_comparison"),
    "read_jsonl": ("codis_lib.metrics_log", "read_jsonl"),
    "plot_loss_curves": ("codis_lib.viz", "plot_loss_curves"),
    "plot_series": ("codis_lib.viz", "plot_series"),
    "smooth": ("codis_lib.viz", "smooth"),
    "sample_seeds": ("codis_lib.train.sampler", "sample_seeds"),
    "teacher_batch_inputs": ("codis_lib.train.batches", "teacher_batch_inputs"),
    # evaluate (the retrieval parts through codis_lib.evaluation, which re-exports them)
    "evaluate_retrieval": ("codis_lib.evaluation.retrieval", "evaluate_retrieval"),
    "RetrievalFeatures": ("codis_lib.evaluation", "RetrievalFeatures"),
    "dataset_features": ("codis_lib.evaluation", "dataset_features"),
    "evaluate_features": ("codis_lib.evaluation", "evaluate_features"),
    "itm_rerank_batched": ("codis_lib.evaluation", "itm_rerank_batched"),
    "rerank_at_depth": ("codis_lib.evaluation", "rerank_at_depth"),
    "itm_rerank_one_query_at_a_time": ("codis_lib.evaluation", "itm_rerank_one_query_at_a_time"),
    "ranks_of_best_match": ("codis_lib.evaluation", "ranks_of_best_match"),
    "retrieval_metrics": ("codis_lib.evaluation", "retrieval_metrics"),
    "retrieval_split_dataset": ("codis_lib.evaluation.report", "retrieval_split_dataset"),
    "retrieval_report": ("codis_lib.evaluation.report", "retrieval_report"),
    "format_retrieval_table": ("codis_lib.evaluation.report", "format_retrieval_table"),
    "format_evaluation_table": ("codis_lib.evaluation.report", "format_evaluation_table"),
    "retrieval_split_file": ("codis_lib.evaluation.report", "retrieval_split_file"),
    "split_title": ("codis_lib.evaluation.report", "split_title"),
    "EMOJI_SPLIT_DESCRIPTIONS": ("codis_lib.evaluation.report", "EMOJI_SPLIT_DESCRIPTIONS"),
    "run_evaluation": ("codis_lib.evaluation.cli", "run_evaluation"),
    "rank_images_for_text": ("codis_lib.evaluation.word_queries", "rank_images_for_text"),
    "text_image_similarity": ("codis_lib.evaluation.word_queries", "text_image_similarity"),
    "gallery_image_features": ("codis_lib.evaluation.word_queries", "gallery_image_features"),
    "gallery_names": ("codis_lib.evaluation.word_queries", "gallery_names"),
    "answering_images": ("codis_lib.evaluation.word_queries", "answering_images"),
    "paper_rows": ("codis_lib.evaluation.paper", "paper_rows"),
    "format_poster_markdown": ("codis_lib.evaluation.paper", "format_poster_markdown"),
    "GradCAM": ("codis_lib.evaluation.gradcam", "GradCAM"),
    "gradcam": ("codis_lib.evaluation.gradcam", "gradcam"),
    "gradcam_by_layer": ("codis_lib.evaluation.gradcam", "gradcam_by_layer"),
    "content_words": ("codis_lib.evaluation.gradcam", "content_words"),
    "image_grid": ("codis_lib.evaluation.gradcam", "image_grid"),
    "normalise_map": ("codis_lib.evaluation.gradcam", "normalise_map"),
    "blank_canvas": ("codis_lib.evaluation.gradcam", "blank_canvas"),
    "paste_scaled": ("codis_lib.evaluation.gradcam", "paste_scaled"),
    # optimal transport and the codebook
    "sinkhorn": ("codis_lib.ot", "sinkhorn"),
    "sinkhorn_with_info": ("codis_lib.ot", "sinkhorn_with_info"),
    "ot_cost": ("codis_lib.ot", "ot_cost"),
    "Codebook": ("codis_lib.codebook", "Codebook"),
    "sinkhorn_reference": ("codis_lib.ot", "sinkhorn_reference"),
    "transport_assignments": ("codis_lib.objectives.transport_plans", "transport_assignments"),
    "loss_code": ("codis_lib.objectives.code_loss", "loss_code"),
    "loss_ot": ("codis_lib.objectives.ot_loss", "loss_ot"),
    "codebook_losses": ("codis_lib.codebook", "codebook_losses"),
    "codebook_usage": ("codis_lib.codebook", "codebook_usage"),
    "hard_code_perplexity": ("codis_lib.codebook", "hard_code_perplexity"),
    "random_occupancy": ("codis_lib.codebook", "random_occupancy"),
    # the fusion terms' pieces (notebook 04 derives L_itm and L_mlm by hand against them)
    "hard_negative_similarities": ("codis_lib.objectives.itm", "hard_negative_similarities"),
    "hard_negative_weights": ("codis_lib.objectives.itm", "hard_negative_weights"),
    "sample_hard_negatives": ("codis_lib.objectives.itm", "sample_hard_negatives"),
    "sample_generator": ("codis_lib.objectives.itm", "sample_generator"),
    "image_text_matching": ("codis_lib.objectives.itm", "image_text_matching"),
    "mlm_loss_from_logits": ("codis_lib.objectives.mlm", "mlm_loss_from_logits"),
    # the notebooks' set-up, model and metrics file
    "start_notebook": ("codis_lib.course", "start_notebook"),
    "NotebookRun": ("codis_lib.course", "NotebookRun"),
    "main_model_source": ("codis_lib.course", "main_model_source"),
    "MainModelSource": ("codis_lib.course", "MainModelSource"),
    "load_main_model": ("codis_lib.course", "load_main_model"),
    "write_metrics": ("codis_lib.course", "write_metrics"),
    # constants
    "CLIP_MEAN": ("codis_lib.data.transforms", "CLIP_MEAN"),
    "CLIP_STD": ("codis_lib.data.transforms", "CLIP_STD"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Return the public object `name`, importing its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'codis_lib' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
