"""What a training step of the main recipe costs with and without some of its switches, side by side.

Builds one training run per variant of a packaged config (default `pretrain_emoji`, README command 1's) in
one process, on the real corpus and loader, lets each fill its trunk cache over one epoch, then times
rounds of `--steps` optimizer steps per variant, alternating the order every round so that drift in the
machine's load hits all alike. Prints each variant's median seconds per step and its ratio to the first.

    python benchmarks/bench_recipe_step.py                      # the config; with L_mlm; padded text layers
    python benchmarks/bench_recipe_step.py --threads 2 --rounds 10
    python benchmarks/bench_recipe_step.py --variant "" --variant model.losses.mlm=true

A variant is a comma-separated list of KEY=VALUE overrides ("" is the config as it is). Equal-time
comparisons in docs/results.md take their step ratios from this (the run's own "training s" includes the
trunk's first pass and, on a shared machine, other jobs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from codis_lib.run_config import load_run_config
from codis_lib.train.engine import train_step
from codis_lib.train.process import init_distributed
from codis_lib.train.setup import build_training_run, wrap_model

DEFAULT_VARIANTS = ["", "model.losses.mlm=true", "model.text.unpad=false", "model.losses.mlm=true,model.text.unpad=false"]


def endless_batches(run):
    """Yield the run's training batches epoch after epoch, as the loop does."""
    epoch = 0
    while True:
        run.data.set_epoch(epoch, 0)
        yield from run.data.loader
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="pretrain_emoji")
    parser.add_argument("--variant", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                        help="overrides of one variant (repeat; the first is the baseline of the ratios)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    variants = args.variant if args.variant is not None else DEFAULT_VARIANTS
    torch.set_num_threads(args.threads)
    ctx = init_distributed("cpu")
    work = tempfile.mkdtemp(prefix="bench_recipe_step_")
    runs = []
    for index, variant in enumerate(variants):
        overrides = [item for item in variant.split(",") if item] + [f"train.output_dir={work}/{index}",
                                                                     "train.num_threads=" + str(args.threads)]
        run = build_training_run(load_run_config(args.config, overrides=overrides), ctx)
        wrap_model(run)
        run.model.train()
        runs.append({"run": run, "batches": endless_batches(run), "step": 0})
    for entry in runs:  # one epoch each: the frozen trunk's maps are computed once, then cached
        for _ in range(entry["run"].steps_per_epoch):
            _step(entry)
    seconds = [[] for _ in runs]
    for round_index in range(args.rounds):
        order = range(len(runs)) if round_index % 2 == 0 else reversed(range(len(runs)))
        for index in order:
            started = time.perf_counter()
            for _ in range(args.steps):
                _step(runs[index])
            seconds[index].append((time.perf_counter() - started) / args.steps)
    base = statistics.median(seconds[0])
    print(f"{args.config}, {args.threads} thread(s), {args.rounds} rounds of {args.steps} steps per variant")
    for variant, times in zip(variants, seconds):
        median = statistics.median(times)
        print(f"  {variant or '(the config)':60s} {median:.3f} s/step (spread {min(times):.3f}-{max(times):.3f})"
              f"  ratio {median / base:.2f}")
    return 0


def _step(entry: dict) -> None:
    train_step(entry["run"], entry["batches"], step=entry["step"], epoch=0, alpha=0.4)
    entry["step"] += 1


if __name__ == "__main__":
    sys.exit(main())
