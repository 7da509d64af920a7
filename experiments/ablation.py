"""Ablation: clip vs albef vs codis, same training budget, several seeds, zero-shot retrieval on emoji.

Each run is the real trainer (`python -m codis_lib.train.cli pretrain`, config pretrain_emoji: tiny
model, emoji corpus, the main command's recipe) with only `model.mode`, `train.seed` and the step budget
changed, so every mode gets the same batch size, learning-rate schedule shape, data order and switches.
The trainer evaluates zero-shot retrieval at the end with ALBEF's protocol on every `--split` (default:
`new_drawings`, new drawings of training concepts, and `test`, concepts never seen in training).
Reported per split and mode, as mean +- sample standard deviation over seeds:
- contrastive ranking (ITC), comparable across all three modes;
- ITM re-ranking of the top k, for albef and codis only (clip mode does not train an ITM head);
- a paired comparison seed by seed (same seed = same initialisation and data order): codis - albef,
  albef - clip and codis - clip in mean recall, with how many seeds are positive.
Two budgets: equal steps (`--steps`, every mode), then with `--equal-time` a second set of runs where
each mode gets as many steps as fit in the most expensive mode's mean training time per run (measured in
the equal-steps runs, so both sets share the machine's conditions), reported with the seconds each used.
Runs go `--parallel` at a time, one CPU thread each; a finished run (its eval JSONs exist) is reused
unless --fresh is given, so an interrupted ablation continues where it stopped.

    python experiments/ablation.py --seeds 0 1 2 3 4 --equal-time --time-seeds 0 1 2   # the from-scratch tables of docs/results.md
    python experiments/ablation.py --seeds 0 1 2 3 4 --equal-time --time-seeds 0 1 2 3 4 \
        --step-seconds clip=0.102 albef=0.549 codis=0.393 --split new_drawings --split new_style --split test
                                                            # the ImageNet tower's (per-step costs from 80-step probes)
    python experiments/ablation.py --modes albef codis --steps 100 --seeds 0   # a quick look
    python experiments/ablation.py --split test --out-dir /tmp/codis_ablation_test

Time on 2 CPU cores, 2 runs at a time, 300 steps: a codis run ~3-4 min, albef ~2.5, clip ~1; the command of
docs/results.md (5 seeds, both budgets) took the time printed beside its tables.
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

from codis_lib.data.emoji_concepts import ALL_EVAL_SPLITS
from codis_lib.data.emoji_corpus import emoji_split_file
from codis_lib.evaluation.report import EMOJI_SPLIT_DESCRIPTIONS
from codis_lib.model.trunk_store import TRUNK_CACHE_ENV

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
    parser.add_argument("--split", dest="splits", action="append", choices=ALL_EVAL_SPLITS, default=None,
                        help="evaluation split of the emoji corpus, repeatable (default: new_drawings and test; "
                             "each run writes eval_<split>.json)")
    parser.add_argument("--equal-time", action="store_true",
                        help="also run every mode for the most expensive mode's mean training time")
    parser.add_argument("--time-seeds", nargs="+", type=int, default=None,
                        help="seeds of the equal-time runs (default: --seeds)")
    parser.add_argument("--step-seconds", nargs="+", default=None, metavar="MODE=SECONDS",
                        help="each mode's cost of a step for --equal-time, measured apart (e.g. by a short run of each "
                             "on the idle machine), instead of the equal-steps runs' mean training time: those also "
                             "hold the first pass that fills the trunk cache and whatever ran beside them")
    parser.add_argument("--config", default="pretrain_emoji")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    parser.add_argument("--out-dir", default="/tmp/codis_ablation", help="one sub-folder per run")
    parser.add_argument("--json", default=None, help="results file (default: <out-dir>/ablation.json)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (each uses one thread)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already have results")
    args = parser.parse_args(argv)
    args.splits = args.splits or ["new_drawings", "test"]
    if args.step_seconds is not None:
        costs = {}
        for item in args.step_seconds:
            mode, _, value = item.partition("=")
            try:
                costs[mode] = float(value)
            except ValueError:
                parser.error(f"--step-seconds {item!r}: expected MODE=SECONDS, e.g. clip=0.15")
            if mode not in args.modes or costs[mode] <= 0:
                parser.error(f"--step-seconds {item!r}: the mode must be one of --modes and the seconds positive")
        if set(costs) != set(args.modes):
            parser.error(f"--step-seconds: give every mode of --modes ({', '.join(args.modes)}), got {', '.join(costs)}")
        args.step_seconds = costs
    return args


def run_one(mode: str, seed: int, args, steps: int | None = None, tag: str = "") -> dict:
    """Train (or reuse) one run and return its record: mode, seed, steps, seconds, metrics per split."""
    steps = steps or args.steps
    run_dir = Path(args.out_dir) / f"{mode}_seed{seed}{tag}"
    eval_files = {split: run_dir / f"eval_{split}.json" for split in args.splits}
    reused = not args.fresh and all(f.is_file() for f in eval_files.values())
    if reused and f'"step": {steps},' not in (run_dir / "metrics.jsonl").read_text():
        reused = False  # a run of another length in this folder
    if not reused:
        overrides = {"model.mode": mode, "train.seed": seed, "train.max_steps": steps,
                     "train.batch_size": args.batch_size, "data.root": args.data_root,
                     "train.output_dir": str(run_dir), "train.overwrite": "true", "train.num_threads": 1,
                     "train.progress": "false", "train.tensorboard": "false", "train.log_every": 25,
                     "train.eval.at_end": "true", "train.eval.splits": f"[{', '.join(args.splits)}]",
                     "train.eval.k_test": args.eval_k}
        command = [sys.executable, "-m", "codis_lib.train.cli", "pretrain", "--config", args.config]
        for key, value in overrides.items():
            command += ["--set", f"{key}={value}"]
        for extra in args.overrides:
            command += ["--set", extra]
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(run_dir / "ablation.log", "w") as log:
            # every run reads the frozen ImageNet trunk's maps the first one computed (codis_lib.model.trunk_store)
            trunk_cache = os.environ.get(TRUNK_CACHE_ENV) or str(Path(args.out_dir) / "trunk_cache")
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1", TRUNK_CACHE_ENV: trunk_cache}).returncode
        if status != 0:
            raise RuntimeError(f"{mode} seed {seed} failed (exit {status}); see {run_dir / 'ablation.log'}")
        print(f"  {mode} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    train_records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if '"kind": "train"' in line]
    last = train_records[-1] if train_records else {}
    record = {"mode": mode, "seed": seed, "reused": reused, "steps": last.get("step"), "train_s": last.get("elapsed_s"),
              "final_losses": {k[5:]: v for k, v in last.items() if k.startswith("loss/")}, "splits": {}}
    for split, eval_file in eval_files.items():
        evaluation = json.loads(eval_file.read_text())
        record["splits"][split] = {"itc": evaluation["metrics"]["itc"],
                                   "itm": evaluation["metrics"]["itm"] if mode != "clip" else None,
                                   "num_images": evaluation["num_images"], "num_texts": evaluation["num_texts"],
                                   "k": evaluation["k"]}
    return record


def summarise(runs: list[dict], split: str, ranking: str, modes: list[str]) -> dict:
    """Return {mode: {metric: (mean, std, n)}} over seeds for one split and ranking ("itc" or "itm")."""
    summary = {}
    for mode in modes:
        rows = [r["splits"][split][ranking] for r in runs if r["mode"] == mode and r["splits"][split][ranking]]
        if rows:
            summary[mode] = {m: (statistics.mean(r[m] for r in rows),
                                 statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0, len(rows))
                             for m in METRICS}
    return summary


PAIRS = (("codis", "albef"), ("albef", "clip"), ("codis", "clip"))


def paired(runs: list[dict], split: str, ranking: str = "itc") -> dict:
    """Return {"a - b": [difference of mean recall per seed]} for each pair of modes both run on a seed."""
    by = {(r["mode"], r["seed"]): r["splits"][split][ranking] for r in runs if r["splits"][split][ranking]}
    seeds = sorted({r["seed"] for r in runs})
    out = {}
    for a, b in PAIRS:
        diffs = [by[a, s]["r_mean"] - by[b, s]["r_mean"] for s in seeds if (a, s) in by and (b, s) in by]
        if diffs:
            out[f"{a} - {b}"] = diffs
    return out


def paired_lines(pairs: dict) -> list[str]:
    """Return one line per pair: per-seed differences, their mean and how many are positive."""
    if not pairs:
        return ["- none (fewer than two of the modes have this ranking)"]
    return [f"- {name}: " + " ".join(f"{d:+.2f}" for d in diffs) + f" (mean {statistics.mean(diffs):+.2f}, "
            f"positive in {sum(d > 0 for d in diffs)}/{len(diffs)} seeds)" for name, diffs in pairs.items()]


def markdown_table(summary: dict, title: str) -> str:
    """Return a markdown table of mean +- std per mode."""
    lines = [f"**{title}**", "", "| mode | seeds | " + " | ".join(HEADERS) + " |",
             "|---|---:|" + "---:|" * len(HEADERS)]
    for mode, cells in summary.items():
        seeds = next(iter(cells.values()))[2]
        lines.append(f"| {mode} | {seeds} | " + " | ".join(f"{mean:.2f} ± {std:.2f}" for mean, std, _ in cells.values())
                     + " |")
    return "\n".join(lines)


def run_set(jobs: list[tuple], args, tag: str = "") -> list[dict]:
    """Run (mode, seed, steps) jobs `args.parallel` at a time; return their records in job order."""
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        return list(pool.map(lambda job: run_one(job[0], job[1], args, job[2], tag), jobs))


def report(runs: list[dict], args, budget: str) -> dict:
    """Print the tables and paired comparisons of one budget; return them for the JSON file."""
    out = {}
    seconds = {mode: statistics.mean(r["train_s"] for r in runs if r["mode"] == mode)
               for mode in args.modes if any(r["mode"] == mode for r in runs)}
    steps = {mode: next(r["steps"] for r in runs if r["mode"] == mode) for mode in seconds}
    budget_line = ", ".join(f"{m} {steps[m]} steps / {seconds[m]:.0f} s" for m in seconds)
    for split in args.splits:
        first = runs[0]["splits"][split]
        itc, itm = summarise(runs, split, "itc", args.modes), summarise(runs, split, "itm", args.modes)
        k = max(r["splits"][split]["k"] for r in runs)
        print(f"\n### {budget}: emoji {split} split ({first['num_images']} images, {first['num_texts']} captions, "
              f"{EMOJI_SPLIT_DESCRIPTIONS[split]}); {budget_line} of training (mean per run); "
              f"recall in %, mean ± std over seeds {args.seeds}\n")
        print(markdown_table(itc, "Contrastive ranking (ITC), all modes"))
        print()
        print(markdown_table(itm, f"ITM re-ranked top k={k} (albef, codis)"))
        pairs, pairs_itm = paired(runs, split), paired(runs, split, "itm")
        print("\nPaired by seed, contrastive mean recall:")
        print("\n".join(paired_lines(pairs)))
        print("Paired by seed, ITM re-ranked mean recall:")
        print("\n".join(paired_lines(pairs_itm)))
        out[split] = {"summary_itc": itc, "summary_itm": itm, "paired_itc": pairs, "paired_itm": pairs_itm}
    return {"by_split": out, "train_seconds": seconds, "steps": steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        for split in args.splits:
            emoji_split_file(args.data_root, split)
    except FileNotFoundError as error:
        print(f"ablation: {error}", file=sys.stderr)
        return 2
    jobs = [(mode, seed, args.steps) for seed in args.seeds for mode in args.modes]
    print(f"ablation: {len(jobs)} runs ({', '.join(args.modes)} x seeds {args.seeds}), {args.steps} steps of "
          f"batch {args.batch_size} each, {args.parallel} at a time, in {args.out_dir}", flush=True)
    started = time.perf_counter()
    runs = run_set(jobs, args)
    results = {"equal_steps": report(runs, args, f"Equal steps ({args.steps})")}
    if args.equal_time:
        per_step = args.step_seconds or {mode: results["equal_steps"]["train_seconds"][mode] / args.steps
                                         for mode in args.modes}
        budget_s = max(per_step.values()) * args.steps
        time_steps = {mode: max(1, round(budget_s / per_step[mode])) for mode in args.modes}
        print(f"\nequal time: {budget_s:.0f} s of training per run -> "
              + ", ".join(f"{m} {n} steps" for m, n in time_steps.items()), flush=True)
        time_seeds = args.time_seeds or args.seeds
        timed = run_set([(mode, seed, time_steps[mode]) for seed in time_seeds for mode in args.modes], args,
                        tag="_time")
        results["equal_time"] = report(timed, argparse.Namespace(**{**vars(args), "seeds": time_seeds}),
                                       f"Equal training time ({budget_s:.0f} s)")
        runs += timed
    wall = time.perf_counter() - started
    print(f"\nablation wall time {wall / 60:.1f} min (finished runs reused: {sum(r['reused'] for r in runs)})")
    out = Path(args.json) if args.json else Path(args.out_dir) / "ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds,
                               "modes": args.modes, "eval_k": args.eval_k, "splits": args.splits,
                               "step_seconds": args.step_seconds,
                               "overrides": args.overrides, **results, "wall_s": wall, "runs": runs}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
