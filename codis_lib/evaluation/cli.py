"""`codis-eval`: zero-shot or fine-tuned image-text retrieval of a checkpoint, printed in the poster's layout.

    codis-eval runs/pretrain_emoji/checkpoint_final.pt                       # our checkpoint, its run's eval splits
    codis-eval CKPT --split new_drawings --json eval.json                   # one split of its run's data
    codis-eval CKPT --annotation data/emoji/val.json --k 64 --json eval.json
    codis-eval --albef-checkpoint ALBEF_4M.pth --annotation data/coco_test.json --image-root /data/coco \\
        --image-size 256 --k 256 --paper coco --strict                     # the poster's zero-shot COCO row
    codis-eval --albef-checkpoint mscoco.pth --annotation data/flickr30k_test.json \\
        --image-root /data/flickr30k --albef-config configs/Retrieval_flickr.yaml --paper flickr  # zero-shot Flickr
    torchrun --nproc_per_node 8 -m codis_lib.evaluation.cli CKPT ...        # queries split over 8 processes

Without --annotation, a checkpoint of ours is evaluated on splits of its own run's data: `--split NAME`
(repeatable; emoji: new_drawings, test, val; ALBEF JSON: val, test), by default every split of the
run's `train.eval.splits`; the JSON output is then {split: result}. With --annotation it is one result.

With --paper coco|flickr and --setting, the evaluation is first compared with the protocol of that poster
row (`codis_lib.evaluation.protocol`: checkpoint kind, image size, --k, test file): one warning line per
difference on stderr, or, with --strict, exit 2 before anything is evaluated.

Python: `run_evaluation(...)` returns one result dict (the metrics of `RetrievalEvaluation.to_dict()`
plus what was evaluated), `run_split_evaluations(...)` {split: result dict}, and
`format_evaluation_table(result)` (from `codis_lib.evaluation.report`) the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from codis_lib.cli_args import OneLineParser
from codis_lib.evaluation.report import format_evaluation_table, retrieval_split_dataset, split_description

__all__ = ["run_evaluation", "run_split_evaluations", "load_dataset", "protocol_check", "refuse_output_over_inputs",
           "eval_main"]

ALBEF_TOKENIZER = "bert-base-uncased"  # ALBEF checkpoints' tokenizer when --tokenizer is not given


def _device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {choice}: no CUDA device is visible; use --device cpu")
    return torch.device(choice)


def _init_distributed(device: torch.device) -> bool:
    """Return True when this call created a process group (launched by torchrun with WORLD_SIZE > 1)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def load_dataset(annotation, image_root, image_size: int, *, run_config=None, split: str = "test"):
    """Return the RetrievalEvalDataset to evaluate: `annotation` if given, else `split` of the checkpoint's run."""
    from codis_lib.data.datasets import RetrievalEvalDataset

    if annotation is not None:
        return RetrievalEvalDataset(annotation, image_root, image_size=image_size, check_images="exists")
    if run_config is None:
        raise ValueError("--annotation is required for an ALBEF checkpoint (ALBEF's test JSON, e.g. "
                         "data/flickr30k_test.json, with --image-root)")
    return retrieval_split_dataset(run_config, split)


def _load_model(checkpoint, albef_checkpoint, *, albef_config, bert_config, tokenizer, image_size, device,
                allow_download, weights="student"):
    """Return (LoadedModel, torch device) of one checkpoint, ours or ALBEF's (in a process group under torchrun)."""
    from codis_lib.evaluation.albef_models import load_albef_model, load_our_model

    if (checkpoint is None) == (albef_checkpoint is None):
        raise ValueError("give exactly one of a checkpoint of ours or --albef-checkpoint")
    if albef_checkpoint is not None and weights != "student":
        raise ValueError("--weights teacher: ALBEF's released checkpoints are evaluated with their student weights")
    torch_device = _device(device)
    _init_distributed(torch_device)
    if albef_checkpoint is not None:
        loaded = load_albef_model(albef_checkpoint, task_config=albef_config, bert_config=bert_config,
                                  tokenizer=tokenizer or ALBEF_TOKENIZER, image_res=image_size, device=torch_device,
                                  allow_download=allow_download)
    else:  # a tokenizer given for our checkpoint replaces the run folder's copy; both are checked against it
        loaded = load_our_model(checkpoint, device=torch_device, tokenizer=tokenizer or None, weights=weights)
    model_image_size = loaded.model.config.vision.image_size
    if image_size is not None and albef_checkpoint is None and image_size != model_image_size:
        raise ValueError(f"--image-size {image_size}: the checkpoint's model takes {model_image_size} px images")
    return loaded, torch_device


def _evaluate(loaded, dataset, described: str, *, device: torch.device, score_mode: str, **protocol) -> dict:
    """Return the result dict of `loaded`'s model on `dataset`: the metrics plus what was evaluated, where."""
    from codis_lib.distributed import get_rank, get_world_size
    from codis_lib.evaluation.retrieval import evaluate_retrieval

    evaluation = evaluate_retrieval(loaded.model, dataset, loaded.tokenizer, score_mode=score_mode, device=device,
                                    **protocol)
    result = evaluation.to_dict()
    result.update(model=loaded.description, world_size=get_world_size(), rank=get_rank(), score_mode=score_mode,
                  dataset=described, merged_duplicates=int(getattr(dataset, "merged_duplicates", 0)))
    return result


def run_evaluation(checkpoint: str | os.PathLike | None = None, *, albef_checkpoint=None, albef_config=None,
                   bert_config=None, tokenizer: str | None = None, annotation=None, image_root=None,
                   split: str = "test", image_size: int | None = None, k: int = 128, rerank: bool | None = None,
                   score_mode: str = "itm", image_batch_size: int = 64, text_batch_size: int = 256,
                   pair_batch_size: int = 1024, device: str = "auto", num_workers: int = 0,
                   allow_download: bool = False, weights: str = "student") -> dict:
    """Return the evaluation result dict of one checkpoint (ours, or ALBEF's with `albef_checkpoint`).

    The dataset is `annotation`, or else `split` of the checkpoint's own run. Keys: "metrics" {"itc",
    "itm"}, "headline", "k" (the deepest re-ranking), "k_text_retrieval" / "k_image_retrieval" (k as
    used per direction: clamped to the captions / images there are), "k_requested", "num_images",
    "num_texts", "seconds", "pairs_requested"/"pairs_scored" (re-ranking), "model" (what was evaluated),
    "dataset", "merged_duplicates" (image records merged), "world_size", "rank" (of this process; every
    rank returns the same metrics). `tokenizer`: ALBEF checkpoints' (default bert-base-uncased); for
    ours None uses the run folder's copy, a folder or name replaces it; either is checked against the
    checkpoint's vocabulary size and special ids (ValueError on a mismatch). `weights`: "student", or
    "teacher" for the EMA teacher of one of our checkpoints.
    """
    loaded, torch_device = _load_model(checkpoint, albef_checkpoint, albef_config=albef_config,
                                       bert_config=bert_config, tokenizer=tokenizer, image_size=image_size,
                                       device=device, allow_download=allow_download, weights=weights)
    dataset = load_dataset(annotation, image_root, loaded.model.config.vision.image_size,
                           run_config=loaded.run_config, split=split)
    described = str(annotation) if annotation is not None else f"{split} split of the checkpoint's run"
    return _evaluate(loaded, dataset, described, device=torch_device, score_mode=score_mode, k=k, rerank=rerank,
                     image_batch_size=image_batch_size, text_batch_size=text_batch_size,
                     pair_batch_size=pair_batch_size, num_workers=num_workers)


def run_split_evaluations(checkpoint: str | os.PathLike, *, splits: Sequence[str] | None = None, k: int = 128,
                          rerank: bool | None = None, score_mode: str = "itm", image_batch_size: int = 64,
                          text_batch_size: int = 256, pair_batch_size: int = 1024, device: str = "auto",
                          num_workers: int = 0, image_size: int | None = None,
                          tokenizer: str | None = None, weights: str = "student") -> dict[str, dict]:
    """Return {split: result dict (as `run_evaluation`'s)} of one of our checkpoints on splits of its run's data.

    `splits` defaults to the run's train.eval.splits; the model is loaded once. A name the run's data
    has no split of raises ValueError naming --split; an emoji corpus without the split's file raises
    FileNotFoundError saying how to rebuild it. `image_size`, if given, must be the model's.
    """
    from codis_lib.run_config import eval_split_errors

    loaded, torch_device = _load_model(checkpoint, None, albef_config=None, bert_config=None, tokenizer=tokenizer,
                                       image_size=image_size, device=device, allow_download=False, weights=weights)
    run_config = loaded.run_config
    splits = list(run_config.train.eval.splits if splits is None else splits)
    problems = eval_split_errors(run_config.data, splits, "--split")
    if problems:
        raise ValueError(f"{checkpoint}: {problems[0]}")
    return {split: _evaluate(loaded, retrieval_split_dataset(run_config, split),
                             f"the {split} split of the checkpoint's run ({split_description(run_config, split)})",
                             device=torch_device, score_mode=score_mode, k=k, rerank=rerank,
                             image_batch_size=image_batch_size, text_batch_size=text_batch_size,
                             pair_batch_size=pair_batch_size, num_workers=num_workers)
            for split in splits}


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="codis-eval", description="Image-text retrieval with ALBEF's protocol: contrastive ranking of all "
        "candidates, then ITM re-ranking of each query's top k. Prints TR/IR R@1/5/10 in the poster's layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="a checkpoint written by codis-pretrain / codis-finetune / notebook 04")
    albef = parser.add_argument_group("ALBEF checkpoints (instead of ours)")
    albef.add_argument("--albef-checkpoint", default=None, help="ALBEF_4M.pth or a retrieval-fine-tuned ALBEF .pth")
    albef.add_argument("--albef-config", default=None,
                       help="ALBEF's task YAML (e.g. configs/Retrieval_flickr.yaml) or our export's .config.json; "
                            "default: ALBEF's published retrieval values")
    albef.add_argument("--bert-config", default=None, help="ALBEF's configs/config_bert.json (default: its values)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or hub name. ALBEF checkpoints: default bert-base-uncased (local "
                             "Hugging Face cache). Ours: default the run folder's copy; given, it is used instead "
                             "(e.g. for a checkpoint copied without its run folder). Either way it must match the "
                             "checkpoint's vocabulary size and special ids"),
    albef.add_argument("--allow-download", choices=("yes", "no"), default="no",
                       help="let the tokenizer download from the hub when it is not cached")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="which weights of our checkpoint to score: the student (what training optimised) or "
                        "its EMA teacher")
    data = parser.add_argument_group("data")
    data.add_argument("--annotation", default=None,
                      help="ALBEF retrieval test JSON ({image, caption: [...]}); default: the checkpoint run's "
                           "splits (--split)")
    data.add_argument("--image-root", default=None, help="folder the JSON's image paths are relative to "
                                                          "(default: the JSON's folder)")
    data.add_argument("--split", dest="splits", action="append", default=None, metavar="NAME",
                      help="split of the checkpoint run's data (repeatable; emoji: new_drawings, test, val; ALBEF "
                           "JSON: val, test); default: every split of the run's train.eval.splits")
    data.add_argument("--image-size", type=int, default=None,
                      help="ALBEF checkpoints: evaluation resolution (384 in ALBEF's retrieval configs)")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--k", type=int, default=128, help="candidates re-ranked per query (ALBEF: 256 COCO, 128 Flickr)")
    protocol.add_argument("--rerank", choices=("auto", "yes", "no"), default="auto",
                          help="ITM re-ranking; auto = when the model's mode trains the ITM head (not clip)")
    protocol.add_argument("--score-mode", choices=("itm", "itm_plus_sim"), default="itm",
                          help="itm: ALBEF (ITM logit alone); itm_plus_sim: BLIP's sum with the contrastive score")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--image-batch-size", type=int, default=64)
    speed.add_argument("--text-batch-size", type=int, default=256)
    speed.add_argument("--pair-batch-size", type=int, default=1024,
                       help="(image, caption) pairs per fusion call; lower it if the GPU runs out of memory")
    speed.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for the images")
    speed.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    output = parser.add_argument_group("output")
    output.add_argument("--paper", choices=("none", "coco", "flickr"), default="none",
                        help="print the poster's ALBEF 4M and CODIS rows of this dataset above ours")
    output.add_argument("--setting", choices=("zero-shot", "fine-tuned"), default="zero-shot",
                        help="which poster table the --paper rows come from")
    output.add_argument("--strict", action="store_true",
                        help="with --paper: a difference from the poster row's protocol (checkpoint kind, image "
                             "size, --k, test file) is an error (exit 2) before evaluating, not a warning; what "
                             "cannot be told stays a warning")
    output.add_argument("--json", default=None, help="also write the result dict to this file")
    output.add_argument("--queries", nargs="?", const="everyday", default=None, metavar="WORDS",
                        help="instead of the retrieval tables: everyday word queries on the new_drawings and "
                             "new_style galleries of our checkpoint's emoji corpus (hit@5 against chance); "
                             "WORDS: comma-separated words of your own, each printed with its top 5 images")
    return parser


def _split_files(args: argparse.Namespace, run_config) -> list[str | None]:
    """Return the test file(s) the evaluation will read: --annotation, else the files of the run's splits."""
    from codis_lib.evaluation.report import retrieval_split_file

    if args.annotation is not None:
        return [args.annotation]
    files: list[str | None] = []
    for split in (args.splits if args.splits is not None else run_config.train.eval.splits):
        try:
            files.append(str(retrieval_split_file(run_config, split)))
        except (OSError, ValueError):  # the evaluation itself reports a bad split or a missing file
            files.append(None)
    return files


def protocol_check(args: argparse.Namespace) -> list:
    """Return the ProtocolIssues of this evaluation against the poster row of --paper / --setting (none without --paper).

    Read before anything is evaluated: the checkpoint kind from our run config or the ALBEF checkpoint's
    keys, the image size it will be evaluated at, --k and the test file(s).
    """
    from codis_lib.evaluation.albef_models import albef_config
    from codis_lib.evaluation.protocol import (checkpoint_kind_of_albef, checkpoint_kind_of_ours, protocol_issues,
                                               read_run_config)

    if args.paper == "none":
        if args.strict:
            raise ValueError("--strict checks the evaluation against a poster row: give --paper coco|flickr "
                             "(and --setting)")
        return []
    if (args.checkpoint is None) == (args.albef_checkpoint is None):
        return []  # the evaluation refuses this in one line
    if args.albef_checkpoint is not None:
        kind = checkpoint_kind_of_albef(args.albef_checkpoint)
        image_size = albef_config(args.albef_config, args.bert_config, args.image_size)["image_res"]
        files: list[str | None] = [args.annotation]
    else:
        run_config = read_run_config(Path(args.checkpoint))
        kind = checkpoint_kind_of_ours(run_config)
        image_size = args.image_size or run_config.model.vision.image_size
        files = _split_files(args, run_config)
    issues = []
    for file in files or [None]:
        for issue in protocol_issues(args.setting, args.paper, kind=kind, image_size=image_size, k=args.k,
                                     split_file=file):
            if issue not in issues:
                issues.append(issue)
    return issues


def _evaluations(args: argparse.Namespace) -> tuple[dict[str, dict] | None, dict | None]:
    """Return ({split: result}, None) for our checkpoint on its run's splits, else (None, the one result)."""
    protocol = dict(k=args.k, rerank={"auto": None, "yes": True, "no": False}[args.rerank], score_mode=args.score_mode,
                    image_batch_size=args.image_batch_size, text_batch_size=args.text_batch_size,
                    pair_batch_size=args.pair_batch_size, device=args.device, num_workers=args.num_workers,
                    weights=args.weights)
    if args.splits is not None and (args.annotation is not None or args.albef_checkpoint is not None):
        raise ValueError("--split evaluates splits of our checkpoint's own run; with --annotation (or an ALBEF "
                         "checkpoint) the annotation file is the dataset: give one or the other")
    if args.annotation is None and args.albef_checkpoint is None and args.checkpoint is not None:
        return run_split_evaluations(args.checkpoint, splits=args.splits, image_size=args.image_size,
                                     tokenizer=args.tokenizer, **protocol), None
    return None, run_evaluation(
        args.checkpoint, albef_checkpoint=args.albef_checkpoint, albef_config=args.albef_config,
        bert_config=args.bert_config, tokenizer=args.tokenizer, annotation=args.annotation,
        image_root=args.image_root, image_size=args.image_size, allow_download=args.allow_download == "yes", **protocol)


def refuse_output_over_inputs(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError when --json (links followed) is a file the evaluation reads.

    The inputs: the checkpoint and what its run folder holds beside it (config.yaml, tokenizer/), the
    ALBEF checkpoint and configs, the annotation file, a tokenizer folder given with --tokenizer.
    """
    named = {"the checkpoint": args.checkpoint, "--albef-checkpoint": args.albef_checkpoint,
             "--albef-config": args.albef_config, "--bert-config": args.bert_config, "--annotation": args.annotation}
    output = os.path.realpath(args.json)
    for what, path in named.items():
        if path and os.path.realpath(path) == output:
            raise ValueError(f"--json {args.json}: is {what} ({path}); it would be overwritten; give another file")
    folders = [Path(args.checkpoint).parent / "tokenizer"] if args.checkpoint else []
    folders += [Path(args.tokenizer)] if args.tokenizer and Path(args.tokenizer).is_dir() else []
    beside = [Path(args.checkpoint).parent / "config.yaml"] if args.checkpoint else []
    if any(os.path.realpath(p) == output for p in beside) or any(
            os.path.commonpath([os.path.realpath(f), output]) == os.path.realpath(f) for f in folders):
        raise ValueError(f"--json {args.json}: is a file of the checkpoint's run folder or tokenizer the evaluation "
                         f"reads; it would be overwritten; give another file")


def check_writable(path: str | os.PathLike, what: str = "--json") -> Path:
    """Return ``path`` after making sure a file can be written there (its folder created); raise ValueError if not.

    Checked before the evaluation runs, so that an unwritable output does not cost the whole evaluation.
    A probe file is created and removed in the folder (permission bits alone miss read-only file systems
    and root); an existing file is opened for appending, which leaves it unchanged.
    """
    import tempfile

    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "a"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
                pass
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot write there ({error.strerror or error})") from error
    return path


def _error_lines(error: BaseException) -> list[str]:
    """Return what stderr gets for an input error: its first line, then a mismatch's detail lines.

    A checkpoint that does not fit the model lists its missing, unexpected and misshapen keys on the
    lines after the first (`codis_lib.model.loading`); they are the point of the message and are kept.
    Other errors keep their first line only (tracebacks and multi-line advice left out).
    """
    from codis_lib.model.loading import CheckpointMismatchError

    lines = [line.rstrip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    return lines if isinstance(error, CheckpointMismatchError) else lines[:1]


def _word_queries(args: argparse.Namespace) -> int:
    """Print the everyday-word benchmark (or the given words' top images) for our checkpoint; return 0."""
    from codis_lib.evaluation.word_queries import EVERYDAY_WORDS, WORD_GALLERIES, format_word_table, word_query_report

    if args.checkpoint is None or args.albef_checkpoint is not None or args.annotation is not None:
        raise ValueError("--queries needs one of our emoji checkpoints (and neither --albef-checkpoint nor --annotation)")
    words = EVERYDAY_WORDS if args.queries == "everyday" else tuple(w.strip() for w in args.queries.split(",") if w.strip())
    if not words:
        raise ValueError(f"--queries {args.queries!r}: no word in it")
    loaded, device = _load_model(args.checkpoint, None, albef_config=None, bert_config=None, tokenizer=args.tokenizer,
                                 image_size=args.image_size, device=args.device, allow_download=False,
                                 weights=args.weights)
    splits = args.splits or [s for s in WORD_GALLERIES if s in loaded.run_config.train.eval.splits] or ["new_drawings"]
    results = word_query_report(loaded.model, loaded.tokenizer, loaded.run_config, splits, words=words, device=device)
    if not results:
        raise ValueError(f"--queries: no word gallery among {splits} (use --split new_drawings or new_style)")
    print(format_word_table(results))
    if args.queries != "everyday":
        for result in results:
            for word, names in result.top_names.items():
                print(f"  {result.gallery}: {word!r} -> " + " | ".join(names))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of `codis-eval`; returns the exit status (2 for bad input, with one line on stderr)."""
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    created_group = False
    try:
        if args.json:
            refuse_output_over_inputs(args)
            check_writable(args.json)
        issues = protocol_check(args)
        if os.environ.get("RANK", "0") == "0":
            for issue in issues:
                print(f"codis-eval: warning: {issue.message}", file=sys.stderr)
        mismatches = [issue for issue in issues if issue.severity == "mismatch"]
        if args.strict and mismatches:
            raise ValueError(f"--strict: {len(mismatches)} difference(s) from the protocol of the poster's "
                             f"{args.setting} --paper {args.paper} row (listed above); nothing was evaluated")
        if args.queries is not None:
            return _word_queries(args)
        created_group = _init_distributed(_device(args.device))  # under torchrun: one group for the whole run
        by_split, single = _evaluations(args)
    except (OSError, ValueError, RuntimeError) as error:
        print("codis-eval: " + "\n".join(_error_lines(error)), file=sys.stderr)
        return 2
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    results = list(by_split.values()) if by_split is not None else [single]
    if results[0]["rank"] == 0:
        for result in results:  # one table per split, in order
            title = f"{args.setting.capitalize()} retrieval: {result['model']}\non {result['dataset']}"
            print(format_evaluation_table(result, title=title, paper=None if args.paper == "none" else args.paper,
                                          setting=args.setting))
        print(f"({time.perf_counter() - started:.1f} s, {results[0]['world_size']} process(es))")
        if args.json:
            try:
                Path(args.json).write_text(json.dumps(by_split if by_split is not None else single, indent=2))
            except OSError as error:  # checked at the start; the folder changed since
                print(f"codis-eval: --json {args.json}: cannot write there ({error.strerror or error})",
                      file=sys.stderr)
                return 2
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
