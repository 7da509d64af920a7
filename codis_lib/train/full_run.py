"""Notebook 07's run on the machine at hand: started or resumed, watched while it trains, scored beside chance.

    plan = plan_run()                           # codis_lib.train.launch: pretrain_emoji on a CPU, pretrain_4m on GPUs
    resume = latest_step(run_dir) is not None   # a checkpoint in the run folder: continue from it (--resume)
    progress = LiveProgress(run_dir / "metrics.jsonl", epochs=config.train.epochs, every_s=60)
    outcome = launch_run(plan, {"train.output_dir": run_dir, ...}, resume=resume, progress=progress)
    evaluations = read_evaluations(run_dir, splits)            # {split: eval_<split>.json}
    print(format_recall_with_chance(evaluations["test"]))
    print(format_main_run_comparison(evaluations, "../runs/pretrain_emoji"))

Both launchers run the engine of `codis-pretrain` (`codis_lib.train.engine.train`): "torchrun" as a
subprocess (`run_command`), "inprocess" in the calling process. Either way an interrupt asks the
trainer to save a checkpoint after the current step and stop, so running the notebook again continues.

Chance: a random ranking puts a caption's one matching image among its top K of N images with
probability K/N (IR@K). An image whose c captions are among M finds one of them in its top K with
probability 1 - (1 - K/M)^c, about cK/M = K/N again (TR@K; c = M/N on average).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from codis_lib.checkpoint import FINAL_CHECKPOINT_NAME, checkpoint_step, find_latest_checkpoint
from codis_lib.metrics_log import LOSS_PREFIX, loss_terms, read_jsonl
from codis_lib.train.launch import RunPlan, run_command, torchrun_command

__all__ = ["latest_step", "finished_run", "LiveProgress", "LaunchOutcome", "launch_run", "read_evaluations", "recall_chance",
           "format_recall_with_chance", "compare_with_main_run", "evaluated_step", "format_main_run_comparison"]

RECALL_KS = (1, 5, 10)


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """Return the step of the newest numbered checkpoint in `run_dir`, or None when there is none (a fresh start)."""
    latest = find_latest_checkpoint(run_dir)
    return None if latest is None else checkpoint_step(latest)


# What must match for a finished run to count as this config's: its data and its schedule (the model is
# checked by the trainer on --resume, and config.yaml stores it with the tokenizer's vocabulary).
_SCHEDULE_KEYS = ("task", "epochs", "max_steps", "batch_size", "grad_accum_steps", "seed", "optimizer")


def finished_run(run_dir: str | os.PathLike, run_config) -> bool:
    """Return True when `run_dir` holds a finished run (checkpoint_final.pt) with run_config's data and schedule."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / FINAL_CHECKPOINT_NAME).is_file() or not (run_dir / "config.yaml").is_file():
        return False
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    ours = json.loads(json.dumps(run_config.to_dict()))  # tuples as lists, as YAML reads them back
    same_schedule = all(saved.get("train", {}).get(key) == ours["train"][key] for key in _SCHEDULE_KEYS)
    return same_schedule and saved.get("data") == ours["data"]


# ------------------------------------------------------------------------------------------ watching
class LiveProgress:
    """Every `every_s` seconds: one printed line (step, losses, speed, time left) and the loss curves, redrawn.

    Reads the run's metrics.jsonl (rank 0 appends a record every train.log_every steps). Under IPython the
    figure is one output updated in place, so a saved notebook holds one figure, not one per update; it
    is also written to `figure_file` when given. `tick()` may be called often: it acts only when due.
    """

    def __init__(self, metrics_file: str | os.PathLike, *, epochs: int, max_steps: int | None = None,
                 every_s: float = 60.0, figure_file: str | os.PathLike | None = None, show_figure: bool = True):
        self.metrics_file = Path(metrics_file)
        self.epochs, self.max_steps, self.every_s = epochs, max_steps, every_s
        self.figure_file = None if figure_file is None else Path(figure_file)
        self.show_figure = show_figure
        self.lines: list[str] = []  # what it printed
        self._due = 0.0
        self._shown_step: int | None = None
        self._start_step = self._newest_step()  # what an earlier attempt logged (a resume starts there)
        self._first_seen: tuple[float, int] | None = None  # (time, step) of this run's first record: the speed's origin
        self._display = None
        self._lock = threading.Lock()  # the in-process launcher ticks from a thread, then once from the caller

    def tick(self, *, final: bool = False) -> None:
        """Print a line and redraw the curves if an update is due (always when `final`) and new steps were logged."""
        with self._lock:
            now = time.monotonic()
            if not final and now < self._due:
                return
            self._due = now + self.every_s
            try:
                records = read_jsonl(self.metrics_file) if self.metrics_file.is_file() else []
            except ValueError:  # a line caught half-written: the next tick reads it whole
                return
            if not records or records[-1]["step"] == self._shown_step:
                return
            self._shown_step = records[-1]["step"]
            line = self.describe(records, now)
            self.lines.append(line)
            print(line, flush=True)
            if self.show_figure or self.figure_file is not None:
                self._draw(records)

    def _newest_step(self) -> int | None:
        try:
            records = read_jsonl(self.metrics_file) if self.metrics_file.is_file() else []
        except ValueError:
            return None
        return records[-1]["step"] if records else None

    def total_steps(self, record: dict) -> int | None:
        """Return the steps the run's schedule spans, from a record's step and (fractional) epoch."""
        if not record.get("epoch"):
            return self.max_steps
        total = round(record["step"] / record["epoch"]) * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)

    def describe(self, records: Sequence[dict], now: float) -> str:
        """Return the progress line for the newest record: step of total, loss terms, speed and time left."""
        last = records[-1]
        step, total = last["step"], self.total_steps(last)
        if self._first_seen is None and step != self._start_step:  # start-up time is not a step's
            self._first_seen = (now, step)
        where = f"step {step}/{total} ({100 * step / total:.0f} %)" if total else f"step {step}"
        terms = ", ".join(f"{t} {last[LOSS_PREFIX + t]:.2f}" for t in loss_terms([last]))
        line = f"{where} | loss {last['loss']:.3f} ({terms})"
        if self._first_seen is not None and step > self._first_seen[1]:
            per_step = (now - self._first_seen[0]) / (step - self._first_seen[1])
            line += f" | {per_step:.2f} s/step"
            if total and step < total:
                line += f", about {(total - step) * per_step / 60:.1f} min left"
        return line

    def _draw(self, records: Sequence[dict]) -> None:
        from codis_lib.viz import plot_loss_curves  # matplotlib only once there is something to draw

        import matplotlib.pyplot as plt

        fig = plot_loss_curves(records, smooth_window=max(1, len(records) // 40),
                               title=f"loss curves at step {records[-1]['step']}")
        try:
            if self.figure_file is not None:
                self.figure_file.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(self.figure_file, dpi=100)
            if self.show_figure:
                self._show(fig)
        finally:
            plt.close(fig)

    def _show(self, fig) -> None:
        """Show `fig` in the one display this object owns (IPython only; elsewhere nothing is shown)."""
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        if self._display is None:
            self._display = display(fig, display_id=True)
        else:
            self._display.update(fig)


# ------------------------------------------------------------------------------------------ launching
@dataclass
class LaunchOutcome:
    """How a launch ended: the launcher, its wall time, whether the schedule finished, the newest checkpoint."""

    launcher: str
    seconds: float
    finished: bool  # the last step of the schedule is done (checkpoint_final.pt written)
    steps: int | None  # the step of the newest checkpoint
    log_file: Path | None  # torchrun's output (None in process: it went to the caller's output)


def launch_run(plan: RunPlan, settings: Mapping[str, object], *, resume: bool, stop_at_step: int | None = None,
               progress: LiveProgress | None = None, log_file: str | os.PathLike | None = None,
               timeout_s: float | None = None, tick_s: float = 1.0) -> LaunchOutcome:
    """Return the LaunchOutcome of training `plan.config_name` with `settings` (dotted config keys) by plan.launcher.

    `settings` must hold train.output_dir, the run folder. resume: continue from its newest checkpoint
    (`--resume`). stop_at_step: save a checkpoint and stop after that step (as an interrupt would).
    `progress.tick()` runs about every tick_s seconds while it trains. An interrupt stops the run
    with a checkpoint and raises KeyboardInterrupt; a failed torchrun raises RuntimeError with its tail.
    """
    if "train.output_dir" not in settings:
        raise ValueError("settings: needs 'train.output_dir' (the run folder)")
    run_dir = Path(str(settings["train.output_dir"]))
    started = time.perf_counter()
    log = None
    if plan.launcher == "torchrun":
        extra = (["--resume"] if resume else []) + ([f"--stop-at-step={stop_at_step}"] if stop_at_step else [])
        command = torchrun_command(plan.config_name, settings, nproc_per_node=plan.nproc_per_node, extra_args=extra)
        log = Path(log_file) if log_file is not None else run_dir.with_name(run_dir.name + ".torchrun.log")
        result = run_command(command, log, env={"OMP_NUM_THREADS": str(plan.omp_threads)}, timeout_s=timeout_s,
                             on_tick=progress.tick if progress is not None else None, tick_s=tick_s)
        if result.returncode != 0 and result.stopped_by is None:
            raise RuntimeError(f"torchrun failed (exit {result.returncode}); see {log}:\n{result.tail}")
    elif plan.launcher == "inprocess":
        _train_in_process(plan, settings, resume=resume, stop_at_step=stop_at_step, progress=progress, tick_s=tick_s)
    else:
        raise ValueError(f"plan.launcher={plan.launcher!r}: expected 'torchrun' or 'inprocess'")
    if progress is not None:
        progress.tick(final=True)
    return LaunchOutcome(plan.launcher, time.perf_counter() - started, (run_dir / FINAL_CHECKPOINT_NAME).is_file(),
                         latest_step(run_dir), log)


def _train_in_process(plan: RunPlan, settings: Mapping[str, object], *, resume: bool, stop_at_step: int | None,
                      progress: LiveProgress | None, tick_s: float) -> None:
    """Train in this process (codis_lib.train.engine.train); an interrupt stops it with a checkpoint, then re-raises."""
    from codis_lib.run_config import load_run_config
    from codis_lib.train.engine import train

    config = load_run_config(plan.config_name, overrides=dict(settings))
    with _interrupt_as_sigterm() as interrupted, _ticking(progress, tick_s):
        result = train(config, resume=resume, stop_at_step=stop_at_step)
    if interrupted:
        raise KeyboardInterrupt(f"stopped after step {result.steps} with a checkpoint; run again to continue")


@contextlib.contextmanager
def _interrupt_as_sigterm() -> Iterator[list]:
    """Yield a list that gets an entry when an interrupt (SIGINT) arrived; meanwhile SIGINT asks for a polite stop.

    The trainer answers SIGTERM by saving a checkpoint after the current step (codis_lib.train.signals);
    an interrupt before its handler is in place, or a second one, is the usual KeyboardInterrupt.
    """
    interrupted: list = []
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    outside = signal.getsignal(signal.SIGTERM)

    def on_interrupt(signum, frame):  # noqa: ARG001
        if interrupted or signal.getsignal(signal.SIGTERM) is outside:
            raise KeyboardInterrupt
        interrupted.append(signum)
        print("\n[codis] interrupted: saving a checkpoint after the current step, then stopping", flush=True)
        signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _ticking(progress: LiveProgress | None, tick_s: float) -> Iterator[None]:
    """Call progress.tick() from a background thread about every tick_s seconds while the block runs."""
    if progress is None:
        yield
        return
    done = threading.Event()

    def loop():
        while not done.wait(tick_s):
            progress.tick()

    thread = threading.Thread(target=loop, name="codis-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# ------------------------------------------------------------------------------------------ the result
def read_evaluations(run_dir: str | os.PathLike, splits: Sequence[str]) -> dict[str, dict]:
    """Return {split: the run's eval_<split>.json} for each of `splits` that the run evaluated, in that order."""
    found = {}
    for split in splits:
        path = Path(run_dir) / f"eval_{split}.json"
        if path.is_file():
            found[split] = json.loads(path.read_text())
    return found


def recall_chance(num_images: int, num_texts: int, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Return the recall (%) a random ranking expects, under the keys of an evaluation's headline.

    IR@K (text -> image, `img_r<K>`): K/N of N images. TR@K (image -> text, `txt_r<K>`): 1 - (1 - K/M)^c
    for c = M/N captions per image among M. The means are the means of those, as for the recalls.
    """
    if num_images < 1 or num_texts < 1:
        raise ValueError(f"recall_chance: needs at least one image and one caption, got {num_images}, {num_texts}")
    per_image = num_texts / num_images
    chance = {}
    for k in ks:
        chance[f"txt_r{k}"] = 100.0 * (1.0 - (1.0 - min(k, num_texts) / num_texts) ** per_image)
        chance[f"img_r{k}"] = 100.0 * min(k, num_images) / num_images
    for side in ("txt", "img"):
        chance[f"{side}_r_mean"] = sum(chance[f"{side}_r{k}"] for k in ks) / len(ks)
    chance["r_mean"] = (chance["txt_r_mean"] + chance["img_r_mean"]) / 2
    return chance


def format_recall_with_chance(evaluation: dict, title: str = "") -> str:
    """Return the headline recalls of an evaluation (eval_<split>.json) with chance beside each."""
    recall = evaluation["headline"]
    chance = recall_chance(evaluation["num_images"], evaluation["num_texts"])
    lines = [f"{title or 'retrieval'}: {evaluation['num_images']} images, {evaluation['num_texts']} captions; "
             f"mean recall {recall['r_mean']:.1f} % (chance {chance['r_mean']:.2f} %)"]
    for side, name in (("txt", "TR (image -> text)"), ("img", "IR (text -> image)")):
        ours = " ".join(f"{recall[f'{side}_r{k}']:5.1f}" for k in RECALL_KS)
        random = " ".join(f"{chance[f'{side}_r{k}']:5.2f}" for k in RECALL_KS)
        lines.append(f"  {name:<19s} R@1/5/10 {ours}   chance {random}")
    return "\n".join(lines)


def compare_with_main_run(evaluations: Mapping[str, dict], main_run_dir: str | os.PathLike) -> dict[str, dict]:
    """Return {split: {"this_run": mean recall, "main_run": its mean recall or None}} for each evaluated split.

    `main_run_dir` is README command 1's run folder (runs/pretrain_emoji): its eval_<split>.json files.
    """
    main = read_evaluations(main_run_dir, list(evaluations))
    return {split: {"this_run": evaluation["headline"]["r_mean"],
                    "main_run": main[split]["headline"]["r_mean"] if split in main else None}
            for split, evaluation in evaluations.items()}


def evaluated_step(run_dir: str | os.PathLike) -> int | None:
    """Return the step at which a run's final evaluation was made (its metrics.jsonl), or None if it has none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [record["step"] for record in read_jsonl(path, kind="eval")]
    return max(steps) if steps else None


def format_main_run_comparison(evaluations: Mapping[str, dict], main_run_dir: str | os.PathLike,
                               run_dir: str | os.PathLike | None = None) -> str:
    """Return one line per split: this run's mean recall beside README command 1's, or what produces the latter.

    With `run_dir` (this run's folder) the heading gives both runs' step counts, which a trial run
    (train.max_steps) makes differ.
    """
    rows = compare_with_main_run(evaluations, main_run_dir)
    lines = []
    for split, row in rows.items():
        if row["main_run"] is None:
            lines.append(f"  {split:<13s} this run {row['this_run']:5.1f}; no {Path(main_run_dir) / f'eval_{split}.json'}"
                         f" (README command 1, `codis-pretrain`, writes it)")
        else:
            lines.append(f"  {split:<13s} this run {row['this_run']:5.1f}, command 1's run {row['main_run']:5.1f} "
                         f"({row['this_run'] - row['main_run']:+.1f} points)")
    ours, main = (evaluated_step(run_dir) if run_dir is not None else None), evaluated_step(main_run_dir)
    steps = f"this run after {ours} steps, " if ours is not None else ""
    steps += f"command 1's after {main} steps, " if main is not None else ""
    return f"mean recall (%), this run vs README command 1's ({steps}{main_run_dir}):\n" + "\n".join(lines)
