"""Ablation: clip vs albef vs codis, same training budget, several seeds, zero-shot retrieval on emoji.

Each run is the real trainer (`python -m codis_lib.train.cli pretrain`, config pretrain_emoji: tiny
model, emoji corpus) with only `model.mode`, `train.seed` and the step budget changed, so every mode
gets the same number of optimizer steps, the same batch size, learning-rate schedule and data order.
The trainer evaluates zero-shot retrieval on one split at the end with ALBEF's protocol: `--split test`
(the default: emoji concepts never seen in training) or `--split new_drawings` (new drawings of training
concepts). Reported per mode, as mean +- sample standard deviation over seeds:
- contrastive ranking (ITC), comparable across all three modes;
- ITM re-ranking of the top k, for albef and codis only (clip mode does not train an ITM head).
Runs go `--parallel` at a time, one CPU thread each; a finished run (its eval JSON exists) is reused
unless --fresh is given, so an interrupted ablation continues where it stopped.

    python benchmarks/ablation.py                                   # 3 modes x 3 seeds x 300 steps, 2 at a time
    python benchmarks/ablation.py --seeds 0 1 2 3 4 --steps 600     # more seeds, longer runs
    python benchmarks/ablation.py --modes albef codis --steps 100 --seeds 0   # a quick look
    python benchmarks/ablation.py --split new_drawings --out-dir /tmp/codis_ablation_nd   # the familiar concepts

About 25 minutes on 2 CPU cores with the defaults (codis steps cost ~1 s, clip steps ~0.3 s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from codis_lib.data.emoji_corpus import EVAL_SPLITS, emoji_split_file
from codis_lib.evaluation.report import EMOJI_SPLIT_DESCRIPTIONS

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
HEADERS = ("TR R@1", "TR R@5", "TR R@10", "IR R@1", "IR R@5", "IR R@10", "mean")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["clip", "albef", "codis"], choices=["clip", "albef", "codis"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (the shared budget)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-k", type=int, default=16, help="ITM re-ranking depth of the zero-shot evaluation")
    parser.add_argument("--data-root", default=str(REPO_ROOT / "data" / "emoji"))
    parser.add_argument("--split", default="test", choices=EVAL_SPLITS,
                        help="evaluation split of the emoji corpus (each run writes eval_<split>.json)")
    parser.add_argument("--config", default="pretrain_emoji")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    parser.add_argument("--out-dir", default="/tmp/codis_ablation", help="one sub-folder per run")
    parser.add_argument("--json", default=None, help="results file (default: <out-dir>/ablation.json)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (each uses one thread)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already have results")
    return parser.parse_args(argv)


def run_one(mode: str, seed: int, args) -> dict:
    """Train (or reuse) one run and return its record: mode, seed, metrics, seconds."""
    run_dir = Path(args.out_dir) / f"{mode}_seed{seed}"
    eval_file = run_dir / f"eval_{args.split}.json"
    reused = not args.fresh and eval_file.is_file()
    if not reused:
        overrides = {"model.mode": mode, "train.seed": seed, "train.max_steps": args.steps,
                     "train.batch_size": args.batch_size, "data.root": args.data_root,
                     "train.output_dir": str(run_dir), "train.overwrite": "true", "train.num_threads": 1,
                     "train.progress": "false", "train.tensorboard": "false", "train.log_every": 25,
                     "train.eval.at_end": "true", "train.eval.splits": f"[{args.split}]",
                     "train.eval.k_test": args.eval_k}
        command = [sys.executable, "-m", "codis_lib.train.cli", "pretrain", "--config", args.config]
        for key, value in overrides.items():
            command += ["--set", f"{key}={value}"]
        for extra in args.overrides:
            command += ["--set", extra]
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(run_dir / "ablation.log", "w") as log:
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        if status != 0:
            raise RuntimeError(f"{mode} seed {seed} failed (exit {status}); see {run_dir / 'ablation.log'}")
        print(f"  {mode} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    evaluation = json.loads(eval_file.read_text())
    train_records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if '"kind": "train"' in line]
    return {"mode": mode, "seed": seed, "reused": reused, "steps": train_records[-1]["step"] if train_records else None,
            "train_s": train_records[-1].get("elapsed_s") if train_records else None,
            "final_losses": {k[5:]: v for k, v in (train_records[-1] if train_records else {}).items()
                             if k.startswith("loss/")},
            "itc": evaluation["metrics"]["itc"],
            "itm": evaluation["metrics"]["itm"] if mode != "clip" else None,
            "num_images": evaluation["num_images"], "num_texts": evaluation["num_texts"], "k": evaluation["k"]}


def summarise(runs: list[dict], ranking: str, modes: list[str]) -> dict:
    """Return {mode: {metric: (mean, std, n)}} over seeds for one ranking ("itc" or "itm")."""
    summary = {}
    for mode in modes:
        rows = [r[ranking] for r in runs if r["mode"] == mode and r[ranking] is not None]
        if rows:
            summary[mode] = {m: (statistics.mean(r[m] for r in rows),
                                 statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0, len(rows))
                             for m in METRICS}
    return summary


def markdown_table(summary: dict, title: str) -> str:
    """Return a markdown table of mean +- std per mode."""
    lines = [f"**{title}**", "", "| mode | seeds | " + " | ".join(HEADERS) + " |",
             "|---|---:|" + "---:|" * len(HEADERS)]
    for mode, cells in summary.items():
        seeds = next(iter(cells.values()))[2]
        lines.append(f"| {mode} | {seeds} | " + " | ".join(f"{mean:.2f} ± {std:.2f}" for mean, std, _ in cells.values())
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        emoji_split_file(args.data_root, args.split)
    except FileNotFoundError as error:
        print(f"ablation: {error}", file=sys.stderr)
        return 2
    jobs = [(mode, seed) for seed in args.seeds for mode in args.modes]
    print(f"ablation: {len(jobs)} runs ({', '.join(args.modes)} x seeds {args.seeds}), {args.steps} steps of "
          f"batch {args.batch_size} each, {args.parallel} at a time, in {args.out_dir}", flush=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = list(pool.map(lambda job: run_one(*job, args), jobs))
    wall = time.perf_counter() - started
    itc, itm = summarise(runs, "itc", args.modes), summarise(runs, "itm", args.modes)
    first = runs[0]
    k = max(r["k"] for r in runs)  # clip runs are not re-ranked (k = 0)
    context = (f"zero-shot retrieval on the emoji {args.split} split ({first['num_images']} images, "
               f"{first['num_texts']} captions, {EMOJI_SPLIT_DESCRIPTIONS[args.split]}) after {args.steps} steps "
               f"of batch {args.batch_size}; "
               f"recall in %, mean ± std over seeds {args.seeds}")
    print()
    print(markdown_table(itc, "Contrastive ranking (ITC), all modes"))
    print()
    print(markdown_table(itm, f"ITM re-ranked top k={k} (albef, codis)"))
    print()
    print(context)
    seconds = {mode: statistics.mean(r["train_s"] for r in runs if r["mode"] == mode and r["train_s"])
               for mode in args.modes}
    print("mean training seconds per run: " + ", ".join(f"{m} {s:.0f}" for m, s in seconds.items())
          + f"; ablation wall time {wall / 60:.1f} min (finished runs reused: {sum(r['reused'] for r in runs)})")
    out = Path(args.json) if args.json else Path(args.out_dir) / "ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"context": context, "steps": args.steps, "batch_size": args.batch_size,
                               "seeds": args.seeds, "modes": args.modes, "eval_k": args.eval_k, "split": args.split,
                               "summary_itc": itc, "summary_itm": itm, "train_seconds": seconds,
                               "wall_s": wall, "runs": runs}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
