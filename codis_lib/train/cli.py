"""Command lines `codis-pretrain` and `codis-finetune` (also `python -m codis_lib.train.cli pretrain|finetune`).

    codis-pretrain                       # tiny CODIS on the emoji corpus (built if missing), then retrieval tables
    codis-pretrain --set train.epochs=2 --set train.batch_size=32
    codis-pretrain --resume              # continue from the latest checkpoint in train.output_dir
    torchrun --nproc_per_node 8 -m codis_lib.train.cli pretrain --config pretrain_4m
    codis-finetune                       # retrieval fine-tuning on the emoji corpus from the emoji pretraining
    codis-finetune --config finetune_coco --set train.init_from=runs/pretrain_4m/checkpoint_final.pt

Every setting lives in the YAML config (`codis_lib/configs/*.yaml`, or your own file); `--set
dotted.key=value` changes one (the value is read as YAML: 8, 1e-4, true, null, [a, b]). Exit status:
0 done (or stopped with a checkpoint by --stop-at-step or SIGTERM), 1 training stopped on a non-finite
loss, gradient or state, 2 bad configuration or input (one line on stderr naming the file, record, key
or argument: config errors, missing or unreadable files, a run folder in use or not writable, a full
disk), 130 interrupted by Ctrl-C (one line naming the latest checkpoint), 143 SIGTERM outside training (before the first step, or during the final evaluation, which is
then skipped: one line says what was saved; `codis_lib.train.signals`). Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from codis_lib.cli_args import OneLineParser
from codis_lib.typed_config import ConfigError

# What bad input raises, all the way down: config errors and every file, record, checkpoint or folder
# problem (ConfigError, AnnotationError, CheckpointMismatchError, CheckpointReadError and UnicodeDecodeError
# are ValueErrors; FileNotFoundError, PermissionError, RunFolderLockedError, CheckpointWriteError OSErrors).
INPUT_ERRORS = (ValueError, OSError)


def _step_number(text: str) -> int:
    """Return `text` as an optimizer step (>= 1) for --stop-at-step."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (an optimizer step to stop after), got {value}")
    return value


def _parser(prog: str, default_config: str, what: str) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog, description=what,
        epilog="Configs: codis_lib/configs/ (pretrain_emoji, pretrain_4m, finetune_emoji, finetune_coco, "
               "finetune_flickr). Multi-GPU: torchrun --nproc_per_node N -m codis_lib.train.cli "
               f"{'pretrain' if 'pretrain' in prog else 'finetune'} --config ...")
    parser.add_argument("--config", default=default_config,
                        help=f"packaged config name or YAML path (default: {default_config})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.batch_size=32 (repeatable). "
                             "Useful knobs: train.epochs, train.max_steps, train.batch_size (per process), "
                             "train.optimizer.lr, train.precision (auto|fp32|bf16|fp16), train.compile, "
                             "model.gradient_checkpointing, data.root, data.num_workers")
    parser.add_argument("--output-dir", default=None, help="where checkpoints and logs go (train.output_dir)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="resume from the latest checkpoint in the output directory, or from CHECKPOINT")
    parser.add_argument("--stop-at-step", type=_step_number, default=None, metavar="N",
                        help="save a checkpoint and exit after optimizer step N (continue later with --resume); "
                             "the learning-rate schedule still spans the whole run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def _run(argv: list[str] | None, *, prog: str, default_config: str, what: str) -> int:
    args = _parser(prog, default_config, what).parse_args(argv)
    from codis_lib.train.signals import Terminated, stop_on_signals

    try:
        with stop_on_signals(phase="start") as request:  # before torch is imported: no SIGTERM goes unanswered
            return _run_parsed(args, request, prog=prog)
    except Terminated as stopped:
        print(f"{prog}: {_terminated_line(stopped)}", file=sys.stderr, flush=True)
        return 143  # 128 + SIGTERM, as the shell reports a process it ended


def _terminated_line(stopped) -> str:
    """Return the one line saying what a SIGTERM outside training stopped, and what was saved."""
    if stopped.phase == "evaluating":
        return (f"{stopped.signal} during the final evaluation: training finished and {stopped.checkpoint} is saved; "
                f"the evaluation was skipped (evaluate it with: codis-eval {stopped.checkpoint})")
    if stopped.phase == "report":
        return f"{stopped.signal} while printing the results: training had ended and its checkpoint and logs are written"
    return (f"{stopped.signal} before the first training step: stopped, no step trained and no checkpoint written by "
            f"this command (start it again, or --resume where the folder holds a checkpoint)")


def _run_parsed(args: argparse.Namespace, request, *, prog: str) -> int:
    from codis_lib.run_config import load_run_config

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={json.dumps(args.output_dir)}")
    try:
        config = load_run_config(args.config, overrides=overrides)
    except (ConfigError, OSError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml())
        return 0

    from codis_lib.evaluation.report import format_retrieval_table, split_title
    from codis_lib.train.engine import NonFiniteLossError, train

    resume = False if args.resume is None else (True if args.resume == "latest" else args.resume)
    started = time.perf_counter()
    try:
        result = train(config, resume=resume, stop_at_step=args.stop_at_step)
    except NonFiniteLossError as error:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops on the same step; one message
            print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except INPUT_ERRORS as error:
        print(f"{prog}: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: at once, not at the step boundary as SIGTERM; checkpoints are atomic
        from codis_lib.checkpoint import find_latest_checkpoint

        latest = find_latest_checkpoint(config.train.output_dir)
        print(f"{prog}: interrupted (Ctrl-C); " + (f"the latest checkpoint is {latest} (continue with --resume)"
                                                   if latest else "no checkpoint was written"), file=sys.stderr)
        return 130
    request.phase = "report"
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now; torchrun's RANK is not
        wall = time.perf_counter() - started
        by = f" on {result.stopped_by}" if result.stopped_by not in (None, "stop_at_step") else ""
        state = ("finished" if result.finished
                 else f"stopped{by} after step {result.steps}, checkpoint saved (continue with --resume)")
        print(f"\n{prog}: {state}: {result.steps}/{result.total_steps} steps in {result.train_s / 60:.1f} min of "
              f"training, {wall / 60:.1f} min in all")
        print(f"  checkpoint: {result.checkpoint}")
        print(f"  logs:       {result.output_dir / 'metrics.jsonl'} (TensorBoard: {result.output_dir / 'tensorboard'})")
        for split, evaluation in (result.evaluations or {}).items():  # one table per split, in config order
            print(format_retrieval_table(evaluation, title="\n" + split_title(config, split)))
        if result.word_queries:
            from codis_lib.evaluation.word_queries import format_word_table

            print("\n" + format_word_table(result.word_queries))
    return 0


def _one_line(error: BaseException) -> str:
    """Return the message of an input error (a config error's list of keys keeps its lines)."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error.reason} at byte {error.start})"
    text = str(error) or type(error).__name__
    return text if isinstance(error, ConfigError) else " ".join(text.split())


def pretrain_main(argv: list[str] | None = None) -> int:
    """Entry point of `codis-pretrain`; returns the exit status."""
    return _run(argv, prog="codis-pretrain", default_config="pretrain_emoji",
                what="Pretrain CODIS (default: tiny model on the offline emoji corpus, then zero-shot retrieval).")


def finetune_main(argv: list[str] | None = None) -> int:
    """Entry point of `codis-finetune`; returns the exit status."""
    return _run(argv, prog="codis-finetune", default_config="finetune_emoji",
                what="Fine-tune CODIS for image-text retrieval (ALBEF's recipe: image-id positives, 384 px at base size).")


def main(argv: list[str] | None = None) -> int:
    """`python -m codis_lib.train.cli pretrain|finetune ...` (the form torchrun launches)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("pretrain", "finetune"):
        print("usage: python -m codis_lib.train.cli {pretrain,finetune} [options]  (see codis-pretrain --help)",
              file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    return pretrain_main(rest) if command == "pretrain" else finetune_main(rest)


if __name__ == "__main__":
    sys.exit(main())
