"""Measure a packaged config's reference loss curves: codis_lib/configs/reference/<config>.json.

    # pretrain_emoji, its own 120-step schedule (train.max_steps=120), seeds 0, 1, 2:
    python tools/reference_curves.py --config pretrain_emoji --name max_steps=120 --schedule max_steps \\
        --steps 120 --seeds 0 1 2
    # the start of the full 1,500-step schedule (stopped after 60 steps), plus a finished full run's log:
    python tools/reference_curves.py --config pretrain_emoji --name full_schedule --schedule full \\
        --steps 60 --seeds 0 1 --add-run runs/pretrain_emoji
    # only finished runs of the whole schedule (e.g. three seeds of README command 1's recipe):
    python tools/reference_curves.py --config pretrain_emoji --name full_schedule --schedule full \
        --steps 1500 --seeds --add-run runs/seed0 --add-run runs/seed1 --add-run runs/pretrain_emoji
    # a config nobody could measure here (GPU recipes):
    python tools/reference_curves.py --config pretrain_4m --not-measured "needs 8 GPUs and the 4M corpus"

Each seed trains on 1 CPU thread without evaluation into --work-dir/<name>/seed<N> (a folder that already
reached the steps with the same settings is reused). The curve (bins of --bin-steps steps, per loss term:
mean, std, min, max and the band over the seeds, see codis_lib.train.reference) replaces the curve of the
same name in the file; the others are kept. `--add-run FOLDER` adds a finished run's metrics.jsonl under
its own seed (its config.yaml must match the config's settings): its bins beyond --steps have one seed and
no band (shown, not checked).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from codis_lib.run_config import load_run_config
from codis_lib.metrics_log import read_jsonl
from codis_lib.train.reference import REFERENCE_DIR
from codis_lib.train.reference_runs import (build_curve, comparable_config, curve_settings, run_reference_seed,
                                            write_reference)

DESCRIPTIONS = {
    "max_steps": "train.max_steps={steps}: a {steps}-step run with its own warm-up and cosine",
    "full": "the first {steps} steps of the config's whole schedule (--stop-at-step {steps})",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="packaged config name")
    parser.add_argument("--name", default="max_steps", help="curve name (one file holds several)")
    parser.add_argument("--schedule", choices=("max_steps", "full"), default="max_steps")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="seeds to train here (none: only the --add-run folders)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides every seed's run uses (e.g. train.init_from=...)")
    parser.add_argument("--add-run", action="append", default=[], metavar="FOLDER",
                        help="a finished run folder (config.yaml + metrics.jsonl) of the same settings")
    parser.add_argument("--bin-steps", type=int, default=10)
    parser.add_argument("--k-std", type=float, default=3.0)
    parser.add_argument("--rel", type=float, default=0.05)
    parser.add_argument("--work-dir", default="runs/reference")
    parser.add_argument("--out", default=None, help="default: codis_lib/configs/reference/<config>.json")
    parser.add_argument("--not-measured", metavar="WHY", default=None,
                        help="write a 'not yet measured' file saying why (turns the check off with one line)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else REFERENCE_DIR / f"{args.config}.json"
    command = "python tools/reference_curves.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.not_measured is not None:
        write_reference(out, config=args.config, curve=None, bin_steps=args.bin_steps, k_std=args.k_std,
                        rel=args.rel, generated_by=command, status="not yet measured", note=args.not_measured)
        print(f"wrote {out} (not yet measured)")
        return 0

    config = load_run_config(args.config, overrides=args.overrides + ["train.num_threads=1"])
    if args.bin_steps % config.train.log_every:
        parser.error(f"--bin-steps {args.bin_steps} must be a multiple of train.log_every ({config.train.log_every})")
    work_dir = Path(args.work_dir) / args.config / args.name
    runs = {seed: run_reference_seed(config, seed, steps=args.steps, schedule=args.schedule, work_dir=work_dir)
            for seed in args.seeds}
    for folder in map(Path, args.add_run):
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        if comparable_config(saved) != comparable_config(config.to_dict()):
            parser.error(f"--add-run {folder}: its config.yaml has other settings than {args.config}")
        runs[int(saved["train"]["seed"])] = read_jsonl(folder / "metrics.jsonl")
    if not runs:
        parser.error("no runs: give --seeds to train or --add-run folders")
    if args.schedule == "max_steps":
        settings = curve_settings(config.with_overrides({"train.max_steps": args.steps}))
    else:
        settings = curve_settings(config)
    curve = build_curve(args.name, settings, runs, bin_steps=args.bin_steps, k_std=args.k_std, rel=args.rel,
                        description=DESCRIPTIONS[args.schedule].format(steps=args.steps))
    write_reference(out, config=args.config, curve=curve, bin_steps=args.bin_steps, k_std=args.k_std, rel=args.rel,
                    generated_by=command)
    banded = sum(1 for b in curve["bins"] if len(b["seeds"]) > 1)
    print(f"wrote {out}: curve {args.name!r}, seeds {sorted(runs)}, {len(curve['bins'])} bins ({banded} with a band)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
