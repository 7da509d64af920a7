"""Diagnosis of the laptop experiment: component ablations at equal steps, and what a degenerate solution shows.

Every variant is a set of config overrides on `pretrain_emoji_scratch` (tiny model from random, emoji corpus); all get the
same optimizer steps, batch, schedule, data order and seeds. Each run is the real trainer in its own
process (`python -m codis_lib.train.cli pretrain`, one thread; `--parallel` runs at a time; a finished
run with the same overrides is reused unless --fresh), then a measuring process loads its final
checkpoint (`load_trained_model`) and records:
- the temperature trajectory from metrics.jsonl (about 8 points, its minimum and final value);
- on a fixed batch of 256 training pairs (distinct concepts, first caption, no augmentation), forwarded
  in eval mode with `return_details=True` in chunks of the training batch (so the Sinkhorn targets see
  the batch size they see in training): for each active alignment term (i2t, t2i, i2i, t2t) the mean
  positive (paired column) and mean negative (every other column, queue included) similarity in
  cosine units (sim x temperature);
- with a codebook term on: the entropy of the Sinkhorn targets of images and texts (nats, at most ln K),
  KL(targets || the other modality's student predictions) as L_code pairs them, the entropy of the
  student predictions, the perplexity of the students' arg-max codes against the random-occupancy
  baseline (expected perplexity of N uniform throws into K bins, same N), and cross-modal code
  agreement (an image and its caption share the arg-max code, %, with its chance level);
- contrastive retrieval (ALBEF protocol, no ITM re-ranking) on each split the corpus has among
  `new_drawings` (new drawings of training concepts), `test` (unseen concepts), and on 1,000 training
  images (`train1k`, distinct concepts).
Then a table per variant (mean +- std over seeds) and a paired comparison against `codis` seed by seed
(difference of new_drawings mean recall, or test recall when the corpus has no new_drawings split).

    python experiments/diagnose.py                                    # every built-in variant, 3 seeds
    python experiments/diagnose.py --steps 60 --seeds 0 --variants clip codis codis_no_code
    python experiments/diagnose.py --variants codis --variant teacher_view=model.some_key=true,model.alpha=0.2

Time on 2 CPU cores, 2 runs at a time: on an idle machine a codis step costs ~0.8 s, a clip step ~0.3 s,
measuring a run ~30 s, so the defaults (24 variants x 3 seeds x 300 steps) take about 3-3.5 hours, and
about twice that on a shared machine; `--steps 60 --seeds 0 --variants clip codis codis_no_code` took
4.5 minutes on a shared one (load ~7). Override values cannot contain a comma followed by `key=`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "pretrain_emoji_scratch"  # the random tower whose learning the diagnosis is about
MEASURE_FORMAT = 1  # bump when the measurement changes, so reused runs are measured again
PROBE_PAIRS = 256
TRAIN_IMAGES = 1000
CORPUS_SPLITS = ("new_drawings", "test")
ALIGN_TERMS = ("i2t", "t2i", "i2i", "t2t")
TEMPERATURE_POINTS = 8

BUILTIN_VARIANTS: dict[str, dict[str, Any]] = {
    "clip": {"model.mode": "clip"},
    "albef": {"model.mode": "albef"},
    "codis": {},
    **{f"codis_no_{term}": {f"model.losses.{term}": False} for term in ("align_unimodal", "code", "ot", "itm", "mlm")},
    # the recipe's switches, each reverted in turn (pretrain_emoji.yaml explains them)
    "codis_teacher_columns": {"model.align_columns": "teacher"},
    "codis_text_view_same": {"model.teacher_text_view": "same"},
    "codis_learned_temp": {"model.learn_temp": True},
    "codis_temp_lr": {"model.learn_temp": True, "train.optimizer.temp_lr": 1e-4},
    "codis_augment": {"data.augment": True},
    "codis_augment_own_view": {"data.augment": True, "model.teacher_view": "own"},
    "codis_queue64": {"model.queue_size": 64},
    "codis_queue1024": {"model.queue_size": 1024},
    "codis_codebook16": {"model.codebook_size": 16},
    "codis_codebook256": {"model.codebook_size": 256},
    "codis_eps0.02": {"model.sinkhorn_eps": 0.02},
    "codis_eps0.1": {"model.sinkhorn_eps": 0.1},
    "codis_iters1": {"model.sinkhorn_iters": 1},
    "codis_iters10": {"model.sinkhorn_iters": 10},
    "codis_momentum0.95": {"model.momentum": 0.95},
    "codis_alpha0": {"model.alpha": 0.0},
}


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    """Return the command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (the shared budget)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help=f"built-in variants to run (default: all): {', '.join(BUILTIN_VARIANTS)}")
    parser.add_argument("--variant", dest="custom", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help="add a variant of your own, e.g. codis_m99=model.momentum=0.99 (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--data-root", default="data/emoji", help="the emoji corpus folder")
    parser.add_argument("--out-dir", default="/tmp/codis_diagnose", help="one sub-folder per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (each uses one thread)")
    parser.add_argument("--json", default=None, help="results file (default: <out-dir>/diagnose.json)")
    parser.add_argument("--fresh", action="store_true", help="retrain and re-measure runs that already exist")
    parser.add_argument("--measure", default=None, metavar="RUN_DIR", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.steps < 1 or args.parallel < 1:
        parser.error(f"--steps and --parallel must be >= 1, got {args.steps} and {args.parallel}")
    args.data_root, args.out_dir = str(Path(args.data_root).resolve()), str(Path(args.out_dir).resolve())
    return args


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """Return (name, {dotted key: value}) of `NAME=KEY=VALUE,KEY=VALUE` (values parsed as YAML)."""
    from codis_lib.run_config import parse_overrides

    name, _, rest = text.partition("=")
    if not name.strip() or not rest.strip():
        raise SystemExit(f"diagnose: --variant {text!r} is not NAME=KEY=VALUE[,KEY=VALUE ...]")
    items = re.split(r",(?=\s*[A-Za-z_][\w.]*=)", rest)
    return name.strip(), parse_overrides([item.strip() for item in items])


def select_variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Return {name: overrides} of the variants to run, each checked by loading its config (errors name the key)."""
    from codis_lib.run_config import ConfigError, load_run_config, parse_overrides

    names = args.variants if args.variants is not None else ([] if args.custom else list(BUILTIN_VARIANTS))
    unknown = [name for name in names if name not in BUILTIN_VARIANTS]
    if unknown:
        raise SystemExit(f"diagnose: unknown variant(s) {', '.join(unknown)}; built-in: {', '.join(BUILTIN_VARIANTS)}")
    variants = {name: dict(BUILTIN_VARIANTS[name]) for name in names}
    for text in args.custom:
        name, overrides = parse_variant(text)
        if name in variants:
            raise SystemExit(f"diagnose: --variant {name!r} is already a variant of this run; choose another name")
        variants[name] = overrides
    common = parse_overrides(args.overrides)
    for name, overrides in variants.items():
        try:
            load_run_config(CONFIG, overrides={**common, **overrides, "data.root": args.data_root,
                                               "train.max_steps": args.steps}, world_size=1)
        except ConfigError as error:
            raise SystemExit(f"diagnose: variant {name}: {error}") from error
    return variants


# ---------------------------------------------------------------------------------------------- fixed inputs
def _distinct_concepts(records: list[dict]) -> list[dict]:
    """Return the records whose first caption was not seen before (one drawing per concept), in order."""
    seen, kept = set(), []
    for record in records:
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        if captions[0] not in seen:
            seen.add(captions[0])
            kept.append({"image": record["image"], "caption": captions})
    return kept


def _evenly_spaced(items: list, count: int) -> list:
    """Return `count` items spread evenly over `items` (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def prepare_inputs(data_root: Path, out_dir: Path) -> Path:
    """Return the folder holding probe.json (256 training pairs, first caption) and train1k.json (1,000 images).

    Both are ALBEF retrieval files whose image paths point into `data_root`; they are rewritten on
    every call from pretrain.json, so every run of this command measures the same pairs.
    """
    records = _distinct_concepts(json.loads((data_root / "pretrain.json").read_text()))
    for record in records:
        record["image"] = str((data_root / record["image"]).resolve())
    folder = out_dir / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    probe = [{"image": r["image"], "caption": r["caption"][:1]} for r in _evenly_spaced(records, PROBE_PAIRS)]
    (folder / "probe.json").write_text(json.dumps(probe, indent=1))
    (folder / "train1k.json").write_text(json.dumps(_evenly_spaced(records, TRAIN_IMAGES), indent=1))
    return folder


# ---------------------------------------------------------------------------------------------- one run
def run_overrides(overrides: dict[str, Any], seed: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    """Return the trainer's `--set` values of one run: the common ones, the variant's, then the budget and seed."""
    fixed = {"train.seed": seed, "train.max_steps": args.steps, "data.root": args.data_root,
             "train.output_dir": str(run_dir), "train.overwrite": True, "train.num_threads": 1,
             "train.progress": False, "train.tensorboard": False, "train.log_every": 1, "train.eval.at_end": False}
    values = list(args.overrides) + [f"{key}={json.dumps(value)}" for key, value in {**overrides, **fixed}.items()]
    return values


def _subprocess(command: list[str], log: Path) -> None:
    """Run `command` from the repository root with one thread; raise RuntimeError naming the log on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    with open(log, "w") as stream:
        status = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env).returncode
    if status != 0:
        raise RuntimeError(f"{command[1:4]} failed (exit {status}); see {log}")


def run_one(name: str, overrides: dict[str, Any], seed: int, inputs: Path, args: argparse.Namespace) -> dict:
    """Train (or reuse) one run, measure it (or reuse its measurement) and return the measurement."""
    run_dir = Path(args.out_dir) / f"{name}_seed{seed}"
    values = run_overrides(overrides, seed, run_dir, args)
    stamp, checkpoint = run_dir / "diagnose_run.json", run_dir / "checkpoint_final.pt"
    measured = run_dir / "measure.json"
    same_run = (not args.fresh and checkpoint.is_file() and stamp.is_file()
                and json.loads(stamp.read_text()) == {"config": CONFIG, "overrides": values})
    started = time.perf_counter()
    if not same_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        command = [sys.executable, "-m", "codis_lib.train.cli", "pretrain", "--config", CONFIG]
        _subprocess(command + [item for value in values for item in ("--set", value)], run_dir / "train.log")
        stamp.write_text(json.dumps({"config": CONFIG, "overrides": values}))
    fresh_measure = not (same_run and measured.is_file()
                         and json.loads(measured.read_text()).get("format") == MEASURE_FORMAT)
    if fresh_measure:
        _subprocess([sys.executable, str(Path(__file__).resolve()), "--measure", str(run_dir), "--data-root",
                     args.data_root, "--out-dir", args.out_dir], run_dir / "measure.log")
    result = json.loads(measured.read_text())
    result.update(variant=name, seed=seed, reused=same_run and not fresh_measure)
    print(f"  {name} seed {seed}: {time.perf_counter() - started:.0f} s"
          + (" (reused)" if result["reused"] else ""), flush=True)
    return result


# ---------------------------------------------------------------------------------------------- measuring
def temperature_trajectory(metrics_file: Path) -> dict:
    """Return ~8 evenly spaced (step, temperature) points of the training log, its minimum and final value."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    points = [(r["step"], r["temperature"]) for r in records if r.get("kind") == "train" and "temperature" in r]
    if not points:
        raise ValueError(f"{metrics_file}: no training record with a temperature")
    picked = _evenly_spaced(points, TEMPERATURE_POINTS + 1)
    low = min(points, key=lambda point: point[1])
    return {"points": [[step, round(value, 5)] for step, value in picked], "min": round(low[1], 5),
            "min_step": low[0], "final": round(points[-1][1], 5), "first": round(points[0][1], 5)}


def random_occupancy_perplexity(throws: int, bins: int, trials: int = 2000, seed: int = 0) -> float:
    """Return the expected perplexity of the counts of `throws` uniform throws into `bins` bins (seeded estimate)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(bins, (trials, throws), generator=generator)
    counts = torch.zeros(trials, bins).scatter_add_(1, draws, torch.ones(trials, throws))
    frequencies = counts / throws
    entropy = -(frequencies * frequencies.clamp_min(1e-12).log()).sum(dim=1)
    return float(entropy.exp().mean())


def code_statistics(targets: dict, predictions: dict, num_codes: int) -> dict:
    """Return target entropies, KL(targets || predictions) as L_code pairs them, arg-max perplexities and agreement.

    targets, predictions: {"image": (N, K), "text": (N, K)}: Sinkhorn targets of the teacher features
    and softmax predictions of the student features of the same N pairs.
    """
    def entropy(p):
        return float(-(p * p.clamp_min(1e-12).log()).sum(dim=1).mean())

    def kl(t, q):
        return float((t * (t.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(dim=1).mean())

    def perplexity(codes):
        frequencies = codes.bincount(minlength=num_codes).float() / codes.numel()
        frequencies = frequencies[frequencies > 0]
        return math.exp(float(-(frequencies * frequencies.log()).sum()))

    image_codes, text_codes = predictions["image"].argmax(dim=1), predictions["text"].argmax(dim=1)
    share_image = image_codes.bincount(minlength=num_codes).float() / image_codes.numel()
    share_text = text_codes.bincount(minlength=num_codes).float() / text_codes.numel()
    return {"num_codes": num_codes, "ln_k": math.log(num_codes), "pairs": int(image_codes.numel()),
            "target_entropy_image": entropy(targets["image"]), "target_entropy_text": entropy(targets["text"]),
            "kl_target_image_to_text_student": kl(targets["image"], predictions["text"]),
            "kl_target_text_to_image_student": kl(targets["text"], predictions["image"]),
            "prediction_entropy_image": entropy(predictions["image"]),
            "prediction_entropy_text": entropy(predictions["text"]),
            "hard_perplexity_image": perplexity(image_codes), "hard_perplexity_text": perplexity(text_codes),
            "random_perplexity": random_occupancy_perplexity(int(image_codes.numel()), num_codes),
            "agreement": 100.0 * float((image_codes == text_codes).float().mean()),
            "agreement_chance": 100.0 * float((share_image * share_text).sum())}


def probe_measurements(model, tokenizer, probe, batch_size: int, max_tokens: int) -> dict:
    """Return alignment similarities (cosine units) and code statistics of the probe pairs, eval-mode forward."""
    import torch

    from codis_lib.data.collate import tokenize_captions

    images = torch.stack([item["image"] for item in probe.__getitems__(list(range(len(probe))))])
    tokens = tokenize_captions(tokenizer, probe.texts, max_length=max_tokens)
    sums = {term: [0.0, 0, 0.0, 0] for term in ALIGN_TERMS}  # positive sum, count, negative sum, count
    targets, predictions = {"image": [], "text": []}, {"image": [], "text": []}
    for start in range(0, len(probe), batch_size):
        rows = slice(start, start + batch_size)
        image, ids, mask = images[rows], tokens["input_ids"][rows], tokens["attention_mask"][rows]
        output = model(image, ids, mask, alpha=model.config.alpha, return_details=True)
        temperature, details = float(output.diagnostics.temperature), output.details
        for term in ALIGN_TERMS:
            sim = getattr(details, f"sim_{term}")
            if sim is None:
                continue
            cosine = sim.float() * temperature
            paired = torch.zeros_like(cosine, dtype=torch.bool)
            paired[torch.arange(cosine.shape[0]), torch.arange(cosine.shape[0])] = True
            for slot, chosen in ((0, paired), (2, ~paired)):
                sums[term][slot] += float(cosine[chosen].sum())
                sums[term][slot + 1] += int(chosen.sum())
        if details.assign_image is not None:
            targets["image"].append(details.assign_image.float())
            targets["text"].append(details.assign_text.float())
            predictions["image"].append(model.assign_codes(model.encode_image(image)[1]))
            predictions["text"].append(model.assign_codes(model.encode_text(ids, mask)[1]))
    alignment = {term: {"positive": s[0] / s[1], "negative": s[2] / s[3], "gap": s[0] / s[1] - s[2] / s[3]}
                 for term, s in sums.items() if s[1]}
    codes = None
    if targets["image"]:
        codes = code_statistics({k: torch.cat(v) for k, v in targets.items()},
                                {k: torch.cat(v) for k, v in predictions.items()}, model.config.codebook_size)
    return {"alignment": alignment, "codes": codes, "probe_pairs": len(probe), "forward_batch": batch_size}


def measure(run_dir: Path, data_root: Path, inputs: Path) -> dict:
    """Return every measurement of one finished run (see the module docstring); written to <run>/measure.json."""
    import torch

    from codis_lib.data.datasets import RetrievalEvalDataset
    from codis_lib.evaluation.models import load_trained_model
    from codis_lib.evaluation.retrieval import evaluate_retrieval

    torch.manual_seed(0)  # the eval forward still masks tokens for MLM; keep it reproducible
    trained = load_trained_model(run_dir / "checkpoint_final.pt")
    model, run_config = trained.model, trained.run_config
    size = trained.model_config.vision.image_size
    splits = {split: data_root / f"{split}.json" for split in CORPUS_SPLITS if (data_root / f"{split}.json").is_file()}
    splits["train1k"] = inputs / "train1k.json"
    result = {"format": MEASURE_FORMAT, "run_dir": str(run_dir), "steps": trained.step,
              "mode": trained.model_config.mode, "active_losses": trained.model_config.active_losses(),
              "temperature": temperature_trajectory(run_dir / "metrics.jsonl")}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if r.get("kind") == "train"][-1]
    result["train_s"] = last.get("elapsed_s")
    result["final_losses"] = {key[5:]: value for key, value in last.items() if key.startswith("loss/")}
    with torch.no_grad():
        probe = RetrievalEvalDataset(inputs / "probe.json", None, image_size=size, check_images="exists")
        result["probe"] = probe_measurements(model, trained.tokenizer, probe, min(run_config.train.batch_size,
                                                                                   PROBE_PAIRS),
                                             run_config.data.max_tokens)
        result["retrieval"] = {}
        for split, path in splits.items():
            dataset = RetrievalEvalDataset(path, None, image_size=size, cache=True, check_images="exists")
            evaluation = evaluate_retrieval(model, dataset, trained.tokenizer, rerank=False, device="cpu",
                                            distributed=False)
            result["retrieval"][split] = {**evaluation.metrics["itc"], "num_images": len(dataset.img2txt),
                                          "num_texts": len(dataset.txt2img)}
    return result


# ---------------------------------------------------------------------------------------------- reporting
def _mean_std(values: list[float]) -> tuple[float, float] | None:
    """Return (mean, sample std) of the values (std 0 for one), or None for none."""
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_lines(run: dict) -> list[str]:
    """Return the printed block of one run: temperature, alignment similarities, codes, retrieval."""
    t = run["temperature"]
    lines = [f"{run['variant']} seed {run['seed']} ({run['steps']} steps, {run['mode']} mode)",
             "  temperature: " + " ".join(f"{v:.4f}@{s}" for s, v in t["points"])
             + f" | min {t['min']:.4f}@{t['min_step']}"]
    lines.append("  alignment, cosine (positive / negative): " + ", ".join(
        f"{term} {a['positive']:.3f} / {a['negative']:.3f}" for term, a in run["probe"]["alignment"].items()))
    codes = run["probe"]["codes"]
    if codes is not None:
        lines.append(f"  codes K={codes['num_codes']}, N={codes['pairs']}: target entropy image "
                     f"{codes['target_entropy_image']:.2f} / text {codes['target_entropy_text']:.2f} nats "
                     f"(ln K {codes['ln_k']:.2f}); KL(T_image || p_text) "
                     f"{codes['kl_target_image_to_text_student']:.3f}, "
                     f"KL(T_text || p_image) {codes['kl_target_text_to_image_student']:.3f}; prediction entropy "
                     f"{codes['prediction_entropy_image']:.2f} / {codes['prediction_entropy_text']:.2f}")
        lines.append(f"  arg-max codes: perplexity image {codes['hard_perplexity_image']:.1f} / text "
                     f"{codes['hard_perplexity_text']:.1f} (random {codes['random_perplexity']:.1f}); agreement "
                     f"{codes['agreement']:.1f} % (chance {codes['agreement_chance']:.1f} %)")
    lines.append("  retrieval (contrastive, TR@1 IR@1 mean): " + ", ".join(
        f"{split} {m['txt_r1']:.1f} {m['img_r1']:.1f} {m['r_mean']:.2f}" for split, m in run["retrieval"].items()))
    return lines


def summarise(runs: list[dict], variants: list[str]) -> dict:
    """Return {variant: {quantity: [mean, std] or None, "seeds": n}} over the seeds of each variant."""
    summary = {}
    for name in variants:
        rows = [r for r in runs if r["variant"] == name]
        codes = [r["probe"]["codes"] for r in rows if r["probe"]["codes"] is not None]
        cells = {f"{split}_r_mean": _mean_std([r["retrieval"][split]["r_mean"] for r in rows
                                               if split in r["retrieval"]]) for split in (*CORPUS_SPLITS, "train1k")}
        cells["final_temperature"] = _mean_std([r["temperature"]["final"] for r in rows])
        cells["min_temperature"] = _mean_std([r["temperature"]["min"] for r in rows])
        for key in ("hard_perplexity_image", "hard_perplexity_text", "random_perplexity", "agreement",
                    "agreement_chance"):
            cells[key] = _mean_std([c[key] for c in codes])
        summary[name] = {"seeds": len(rows), **cells}
    return summary


def paired_comparison(runs: list[dict], variants: list[str], split: str, baseline: str = "codis") -> dict:
    """Return {variant: {per_seed, mean, positive, seeds}}: its `split` mean recall minus the baseline's, per seed."""
    base = {r["seed"]: r["retrieval"][split]["r_mean"] for r in runs if r["variant"] == baseline}
    comparison = {}
    for name in variants:
        if name == baseline:
            continue
        per_seed = {r["seed"]: round(r["retrieval"][split]["r_mean"] - base[r["seed"]], 6) for r in runs
                    if r["variant"] == name and r["seed"] in base}  # rounded: equal recalls give exactly 0
        if per_seed:
            comparison[name] = {"per_seed": per_seed, "mean": statistics.mean(per_seed.values()),
                                "positive": sum(d > 0 for d in per_seed.values()), "seeds": len(per_seed)}
    return comparison


def summary_table(summary: dict, comparison: dict, split: str) -> str:
    """Return the markdown table of the summary and the paired comparison."""
    def cell(value, digits=2):
        return "–" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"

    lines = ["| variant | seeds | new_drawings R | test R | train1k R | final τ | ppl image / text (random) "
             f"| agreement % (chance) | Δ {split} R vs codis (positive) |", "|---|---:|" + "---:|" * 7]
    for name, s in summary.items():
        ppl = "–" if s["hard_perplexity_image"] is None else (
            f"{s['hard_perplexity_image'][0]:.1f} / {s['hard_perplexity_text'][0]:.1f} "
            f"({s['random_perplexity'][0]:.1f})")
        agree = "–" if s["agreement"] is None else f"{s['agreement'][0]:.1f} ({s['agreement_chance'][0]:.1f})"
        paired = comparison.get(name)
        delta = "–" if paired is None else f"{paired['mean']:+.2f} ({paired['positive']}/{paired['seeds']})"
        lines.append(f"| {name} | {s['seeds']} | {cell(s['new_drawings_r_mean'])} | {cell(s['test_r_mean'])} | "
                     f"{cell(s['train1k_r_mean'])} | {cell(s['final_temperature'], 4)} | {ppl} | {agree} | {delta} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    """Run (or reuse) every variant x seed, print each run's block and the summary, write the JSON; return 0."""
    args = parse_args(argv)
    data_root = Path(args.data_root)
    if args.measure:
        run_dir = Path(args.measure)
        result = measure(run_dir, data_root, Path(args.out_dir) / "inputs")
        (run_dir / "measure.json").write_text(json.dumps(result, indent=1))
        return 0
    if not (data_root / "pretrain.json").is_file():
        print(f"diagnose: no emoji corpus in {data_root} (no pretrain.json); build it first: codis-build-emoji",
              file=sys.stderr)
        return 2
    variants = select_variants(args)
    inputs = prepare_inputs(data_root, Path(args.out_dir))
    jobs = [(name, seed) for seed in args.seeds for name in variants]
    print(f"diagnose: {len(jobs)} runs ({', '.join(variants)} x seeds {args.seeds}), {args.steps} steps each, "
          f"{args.parallel} at a time, in {args.out_dir}", flush=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = list(pool.map(lambda job: run_one(job[0], variants[job[0]], job[1], inputs, args), jobs))
    wall = time.perf_counter() - started
    split = "new_drawings" if all("new_drawings" in r["retrieval"] for r in runs) else "test"
    summary, comparison = summarise(runs, list(variants)), paired_comparison(runs, list(variants), split)
    print()
    for run in sorted(runs, key=lambda r: (list(variants).index(r["variant"]), r["seed"])):
        print("\n".join(run_lines(run)))
    print()
    print(summary_table(summary, comparison, split))
    print(f"\nR: contrastive mean recall (%, ALBEF protocol, no re-ranking), mean ± std over seeds {args.seeds}; "
          f"paired Δ on {split}" + ("" if split == "new_drawings" else " (the corpus has no new_drawings split)")
          + f"; wall time {wall / 60:.1f} min")
    out = Path(args.json) if args.json else Path(args.out_dir) / "diagnose.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": CONFIG, "steps": args.steps, "seeds": args.seeds, "overrides": args.overrides,
                               "variants": variants, "paired_split": split, "summary": summary,
                               "paired": comparison, "wall_s": wall, "runs": runs}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
