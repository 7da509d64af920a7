"""The CODIS training loop: `train(config)` around one `train_step`, readable top to bottom (nanoGPT's layout).

The same code runs a 2-core laptop, one GPU, or many GPUs under torchrun:

    codis-pretrain                                              # 1 process, tiny model, emoji corpus
    torchrun --nproc_per_node 8 -m codis_lib.train.cli pretrain --config pretrain_4m

What happens, in order (`train` -> `_train`):
1. Processes (`process.init_distributed`; CPU threads `process.resolve_num_threads`). Under torchrun
   (WORLD_SIZE > 1) a process group is created (NCCL on GPUs, gloo on CPU) and the model is wrapped in
   DistributedDataParallel; a single process needs no group at all.
2. Data, model, optimizer (`setup.build_training_run`; the data: `data.build_train_data`). The emoji
   corpus is built if missing (rank 0; the others wait). `GlobalBatchSampler` cuts a seeded per-epoch
   permutation into global batches and gives each rank a contiguous slice, and `SeededItems` loads item
   i of epoch e under a seed of (seed, e, i): the global batch, its order and every sample's augmentation
   are the same whatever the number of processes. AdamW (ALBEF's groups), warm-up + cosine schedule,
   optional fp16 grad scaler.
3. Where to start (`resume.start_position`): `--resume` restores all of it, the RNG states and the
   position in the epoch from the latest checkpoint; `train.init_from` loads a pretraining checkpoint
   (`codis_lib.model.pretrained.init_from_checkpoint`); else scratch.
4. The loop (`_train_epoch`, `train_step`). For each optimizer step: alpha from its ramp;
   `grad_accum_steps` forwards under autocast (bf16 on GPU by default), each with per-sample seeds for
   the model's own randomness (MLM masking, ITM hard negatives); every loss term is averaged over ranks
   and checked for NaN/inf *before* backward (a non-finite term stops the run naming the term and
   step; no checkpoint is written after it); backward (DDP all-reduces gradients on the last
   micro-batch only); the gradients checked for NaN/inf (`guards`: a non-finite one stops the run naming
   the step and the parameters, before the update; with the fp16 scaler the loss scale is checked);
   clipping; optimizer and schedule step. Rank 0 logs per-term losses, lr, alpha,
   temperature, throughput and codebook usage to metrics.jsonl and TensorBoard, and writes atomic
   checkpoints (`run_dir`), each only after the whole state was checked finite.
5. The end. A final checkpoint (`checkpoint_final.pt`) and, if configured, zero-shot / fine-tuned
   retrieval evaluation on every split of `train.eval.splits` (ALBEF's protocol,
   `codis_lib.evaluation.report`), each written to eval_<split>.json. The splits' files are looked up
   before the first step, so a corpus that lacks one stops the run before training, not after it.

Retrieval fine-tuning (`train.task: finetune`) is the same loop on the retrieval training records,
with `image_ids` passed to the model (positives share an image id, hard negatives never do) and the
weights initialised from a pretraining checkpoint (`train.init_from`, position embeddings resampled
to the new image size). Pretraining with `data.style_variants` passes them too: a record's re-drawings
share its image id, so they are positives of each other, never negatives.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist

from codis_lib import distributed as cdist
from codis_lib.evaluation.word_queries import word_query_report
from codis_lib.evaluation.report import (retrieval_report, retrieval_split_dataset, available_eval_splits,
                                         split_description)
from codis_lib.metrics_log import LOSS_PREFIX, MetricsLogger
from codis_lib.run_config import RunConfig
from codis_lib.train.batches import pad_text_to_global_length, teacher_batch_inputs
from codis_lib.train.data_order import DATA_ORDER_KEY, data_order_record
from codis_lib.train.guards import NonFiniteLossError, check_gradients, check_loss_scale
from codis_lib.train.process import RunContext, init_distributed, resolve_num_threads
from codis_lib.train.reference import CurveCheck
from codis_lib.train.resume import start_position
from codis_lib.train.run_dir import (check_free_space, link_final_checkpoint, lock_output_dir, refuse_data_folder,
                                     save_checkpoint, write_final_evaluations, write_run_files)
from codis_lib.train.sampler import sample_seeds
from codis_lib.train.schedule import alpha_at_step
from codis_lib.train.setup import TrainingRun, build_training_run, describe_run, wrap_model
from codis_lib.train.signals import StopRequest, stop_on_signals
from codis_lib.typed_config import ConfigError

if TYPE_CHECKING:  # the model package itself is imported where a model is built
    from codis_lib.model.output import Diagnostics

__all__ = ["train", "train_step", "TrainResult", "NonFiniteLossError"]

# Fields of CODISOutput.diagnostics (codis_lib.model.output.Diagnostics) averaged over ranks and logged
# next to the losses.
LOGGED_DIAGNOSTICS = ("temperature", "codebook_perplexity", "hard_code_perplexity", "dead_codes", "itm_accuracy",
                      "mlm_accuracy")


@dataclass
class TrainResult:
    """What a run produced: where, how far, the logged records (rank 0) and the evaluation per split, if any."""

    output_dir: Path
    steps: int  # optimizer steps done (in total, across resumes)
    total_steps: int  # steps the schedule spans
    finished: bool  # reached total_steps (False when stopped early with stop_at_step or by SIGTERM)
    checkpoint: Path | None  # the last checkpoint written (checkpoint_final.pt when finished)
    records: list[dict] = field(default_factory=list)  # training log records of this invocation (rank 0)
    # {split: retrieval report (`RetrievalEvaluation.to_dict()`)} in train.eval.splits order, when evaluated
    evaluations: dict[str, dict] | None = None
    word_queries: list | None = None  # WordQueryResult per word gallery (codis_lib.evaluation.word_queries)
    wall_s: float = 0.0
    train_s: float = 0.0
    model: Any = field(default=None, repr=False)  # the trained CODIS (unwrapped from DDP), for notebooks
    stopped_by: str | None = None  # "stop_at_step" or the signal ("SIGTERM") that stopped the run early
    # The early-curve check (codis_lib.train.reference): the settings compared with the reference's, the
    # info line saying whether the check ran, and the warnings it printed (one per term outside its band).
    reference_settings: dict = field(default_factory=dict)
    reference_status: str = ""
    reference_warnings: list[str] = field(default_factory=list)


@dataclass
class LoopState:
    """Where the loop is, and what it has written: the part of a run that changes at every step."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    last_checkpoint: Path | None = None
    abandoned: tuple[Path, ...] = ()  # checkpoints newer than the resumed one, until overwritten: never pruned
    stopped_early: bool = False  # stop_at_step reached (or SIGTERM received) before the end of the schedule
    stopped_by: str | None = None
    records: list[dict] = field(default_factory=list)  # training log records of this invocation
    interval: dict[str, float] = field(default_factory=dict)  # sums of the step scalars since the last record
    interval_steps: int = 0
    interval_start: float = field(default_factory=time.perf_counter)
    curve_check: CurveCheck | None = None  # compares the early loss curve with the config's reference


# ------------------------------------------------------------------------------------------ one step
def _step_scalars(losses: dict[str, torch.Tensor], total: torch.Tensor, diagnostics: Diagnostics,
                  device: torch.device) -> dict[str, float]:
    """Return the step's loss terms, total and scalar diagnostics as floats, averaged over ranks.

    Everything goes through one stacked tensor: one all-reduce and one device-to-host copy per
    forward, instead of a GPU synchronisation per value.
    """
    names, values = [], []
    for name, value in losses.items():
        names.append(f"{LOSS_PREFIX}{name}")
        values.append(value.detach().float().reshape(()))
    names.append("loss")
    values.append(total.detach().float().reshape(()))
    for name, value in diagnostics.scalar_tensors(LOGGED_DIAGNOSTICS).items():  # the ones the mode computes
        names.append(name)
        values.append(value)
    packed = torch.stack([v.to(device) for v in values]).double()  # (n,)
    if cdist.is_distributed() and cdist.get_world_size() > 1:
        cdist.all_reduce_sum_(packed)
        packed /= cdist.get_world_size()
    return dict(zip(names, packed.tolist()))


def _stop_if_non_finite(values: dict[str, float], run: TrainingRun, *, step: int, epoch: int, alpha: float,
                        last_checkpoint: Path | None) -> None:
    """Raise NonFiniteLossError naming the first NaN/inf loss term of optimizer step `step` (1-based), if any."""
    bad = [name for name, value in values.items()
           if (name.startswith(LOSS_PREFIX) or name == "loss") and not math.isfinite(value)]
    if not bad:
        return
    term = next((n[len(LOSS_PREFIX):] for n in bad if n.startswith(LOSS_PREFIX)), "total")
    listing = ", ".join(f"{n}={values[n]}" for n in bad)
    where = (f"the last good checkpoint is {last_checkpoint} (resume with --resume)"
             if last_checkpoint is not None else "no checkpoint had been written yet")
    raise NonFiniteLossError(
        f"non-finite loss term '{term}' at step {step} (epoch {epoch}, alpha {alpha:.3f}, "
        f"lr {run.schedule.current_lr():.3g}): {listing}. Training stopped before the update; "
        f"{where}.", term=term, step=step, epoch=epoch, checkpoint=last_checkpoint)


def train_step(run: TrainingRun, batches: Iterator[dict], *, step: int, epoch: int, alpha: float,
               last_checkpoint: Path | None = None) -> dict[str, float]:
    """Return the scalars of one optimizer step (loss terms, total, diagnostics, grad_norm, lr) after taking it.

    `step` optimizer steps are done before this one. Reads `grad_accum_steps` micro-batches from
    `batches`; each forward runs under autocast and its loss terms are checked before backward, so a
    NaN/inf stops the run (NonFiniteLossError, pointing at `last_checkpoint`) before any update.
    """
    tc, ctx = run.config.train, run.ctx
    accum = tc.grad_accum_steps
    step_values: dict[str, float] = {}
    for micro_step in range(accum):
        batch = pad_text_to_global_length(next(batches), ctx)
        image = batch["image"].to(ctx.device, non_blocking=True)
        input_ids = batch["input_ids"].to(ctx.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(ctx.device, non_blocking=True)
        # Fine-tuning, and pretraining with style variants: a record's images share an id (positives of each other)
        image_ids = batch["image_ids"].to(ctx.device) if tc.task == "finetune" or run.config.data.style_variants \
            else None
        teacher = teacher_batch_inputs(batch, run.model_config, ctx.device)  # {} unless the teacher has own views
        seeds = sample_seeds(tc.seed, epoch, batch["index"])  # (B,) from (seed, epoch, dataset index)
        # DDP all-reduces gradients in backward; skip that on all but the last micro-batch.
        skip_sync = ctx.world_size > 1 and micro_step < accum - 1 and hasattr(run.train_model, "no_sync")
        with run.train_model.no_sync() if skip_sync else contextlib.nullcontext():
            with run.autocast:
                output = run.train_model(image, input_ids, attention_mask, alpha=alpha, image_ids=image_ids,
                                         sample_seeds=seeds, **teacher)
            losses, total_loss = dict(output.losses), output.loss
            values = _step_scalars(losses, total_loss, output.diagnostics, ctx.device)
            _stop_if_non_finite(values, run, step=step + 1, epoch=epoch, alpha=alpha, last_checkpoint=last_checkpoint)
            run.scaler.scale(total_loss / accum).backward()
        for name, value in values.items():
            step_values[name] = step_values.get(name, 0.0) + value / accum
    lr = run.schedule.current_lr()
    clip = tc.optimizer.clip_grad_norm
    if clip is not None:
        run.scaler.unscale_(run.optimizer)
    if clip is not None or not run.scaler.is_enabled():
        params = [p for p in run.model.parameters() if p.grad is not None]
        # One norm pass serves the guard and the clipping (clip_grad_norm_ would compute it again).
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        grad_norm_value = float(grad_norm)
        # With the fp16 scaler an overflow skips the update; its scale is checked below. A non-finite total
        # (a NaN/inf gradient, or finite ones whose norm overflows) gets the exact check, which names them.
        if not run.scaler.is_enabled() and not math.isfinite(grad_norm_value):
            check_gradients(run.model, step=step + 1, epoch=epoch, lr=lr, checkpoint=last_checkpoint)
    if clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm)
        step_values["grad_norm"] = grad_norm_value
    step_values["lr"] = lr
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.scaler.is_enabled():
        check_loss_scale(run.scaler.get_scale(), step=step + 1, epoch=epoch, lr=lr, checkpoint=last_checkpoint)
    run.optimizer.zero_grad(set_to_none=True)
    run.schedule.step()
    return step_values


# ------------------------------------------------------------------------------------------ the loop
def train(config: RunConfig, *, resume: bool | str | os.PathLike = False, stop_at_step: int | None = None,
          evaluate: bool | None = None) -> TrainResult:
    """Return the TrainResult of running `config` (see the module docstring for the whole sequence).

    resume: False, True (the latest checkpoint in train.output_dir; FileNotFoundError if there is none),
    or the path of a checkpoint. stop_at_step (>= 1): save a checkpoint and return after this optimizer
    step (to split a long run over several jobs; the schedule still spans the whole run); SIGTERM does
    the same at the next step boundary (before the loop, or during the final evaluation, it raises
    `signals.Terminated` at once). evaluate: override train.eval.at_end. The run folder is locked
    for the whole call (`codis_lib.train.lock`): a second run into a live folder is refused.
    """
    if stop_at_step is not None and stop_at_step < 1:
        raise ConfigError(f"--stop-at-step: must be >= 1 (an optimizer step to stop after), got {stop_at_step}")
    ctx = init_distributed(config.train.device)
    threads_before = torch.get_num_threads()
    threads = resolve_num_threads(config.train.num_threads)
    if threads is not None:
        torch.set_num_threads(threads)
    lock = None
    try:
        refuse_data_folder(Path(config.train.output_dir), config)  # not the corpus's own folder
        lock = lock_output_dir(ctx, Path(config.train.output_dir))  # before anything reads or deletes run files
        with stop_on_signals(phase="setup") as stop_request:  # a SIGTERM before the loop ends the run at once
            return _train(config, ctx, resume=resume, stop_at_step=stop_at_step, evaluate=evaluate,
                          stop_request=stop_request)
    finally:
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads_before)  # a notebook or test session goes on with its own setting
        if ctx.owns_process_group:
            dist.destroy_process_group()


def _train(config: RunConfig, ctx: RunContext, *, resume, stop_at_step, evaluate,
           stop_request: StopRequest) -> TrainResult:
    """Return the TrainResult of the run: set up, start position, the epochs, the final checkpoint and evaluation."""
    started = time.perf_counter()
    tc = config.train
    run = build_training_run(config, ctx)  # data, model (seeded), AdamW, schedule, grad scaler
    run.data_order = data_order_record(run)  # checkpointed; a resume must match it
    evaluate_at_end = tc.eval.at_end if evaluate is None else evaluate
    if evaluate_at_end or tc.eval.every_epochs:
        # fail now, not after training, when the corpus lacks a split's file (an optional style split: skipped)
        run.eval_splits = available_eval_splits(config, tc.eval.splits, log=_warn if ctx.is_main else None)
    start = start_position(run, resume)  # a checkpoint of this run, a pretraining checkpoint, or scratch
    check_free_space(run.output_dir, run.model)  # a full disk now, not at the first checkpoint
    state = LoopState(step=start.step, epoch=start.epoch, step_in_epoch=start.step_in_epoch,
                      last_checkpoint=start.last_checkpoint, abandoned=start.abandoned)
    wrap_model(run)  # DDP, torch.compile, autocast
    # Every rank sees the same (all-reduced) values; rank 0 prints.
    state.curve_check = CurveCheck.for_run(run, start_step=state.step, log=_warn if ctx.is_main else None)
    logger = MetricsLogger(run.output_dir, enabled=ctx.is_main, tensorboard=tc.tensorboard)
    if ctx.is_main:
        write_run_files(run.output_dir, config, run.data.tokenizer)
        print(describe_run(run), flush=True)
        for check in run.data.data_checks:  # the manifest of a cleaned training file, in the run's own log
            logger.log({"kind": "data_check", "step": state.step, **{key: check[key] for key in
                        ("file", "manifest", "manifest_sha256", "matches")}}, step=state.step)
        print(f"[codis] {state.curve_check.status}", flush=True)

    run.model.train()
    stop_request.enter("training")  # from here a SIGTERM waits for the step boundary and its checkpoint
    train_started = state.interval_start = time.perf_counter()
    try:
        while state.step < run.total_steps and not state.stopped_early:
            _train_epoch(run, state, logger, stop_at_step=stop_at_step, train_started=train_started,
                         stop_request=stop_request)
    finally:
        logger.close()
    train_s = time.perf_counter() - train_started

    # ---- the end: final checkpoint and evaluation
    finished = state.step >= run.total_steps
    evaluations, words = None, []
    if finished:
        state.last_checkpoint = link_final_checkpoint(ctx, run.output_dir, state.last_checkpoint)
        if evaluate_at_end:
            stop_request.enter("evaluating", state.last_checkpoint)  # a SIGTERM skips the evaluation, not the run
            evaluations = {split: _report_eval_split(run, split) for split in run.eval_splits}
            words = word_query_report(run.model, run.data.tokenizer, config, run.eval_splits, device=ctx.device)
            if ctx.is_main:
                write_final_evaluations(run.output_dir, evaluations, step=state.step, tensorboard=tc.tensorboard, words=words)
    return TrainResult(output_dir=run.output_dir, steps=state.step, total_steps=run.total_steps, finished=finished,
                       checkpoint=state.last_checkpoint, records=state.records, evaluations=evaluations,
                       word_queries=words if evaluations is not None else None,
                       wall_s=time.perf_counter() - started, train_s=train_s, model=run.model,
                       stopped_by=state.stopped_by, reference_settings=state.curve_check.settings,
                       reference_status=state.curve_check.status, reference_warnings=state.curve_check.warnings)


def _warn(line: str) -> None:
    """Print a reference-curve warning on stderr, where it is not lost among the progress lines."""
    print(f"[codis] WARNING: {line}", file=sys.stderr, flush=True)


def _train_epoch(run: TrainingRun, state: LoopState, logger: MetricsLogger, *, stop_at_step: int | None,
                 train_started: float, stop_request: StopRequest) -> None:
    """Train from `state` to the end of its epoch, of the run, of stop_at_step or of a SIGTERM; then evaluate if due."""
    from tqdm import tqdm

    tc = run.config.train
    run.data.set_epoch(state.epoch, start_batch=state.step_in_epoch * tc.grad_accum_steps)
    batches = iter(run.data.loader)
    progress = tqdm(total=run.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{tc.epochs}",
                    disable=not (run.ctx.is_main and tc.progress), dynamic_ncols=True, leave=False)
    while state.step_in_epoch < run.steps_per_epoch and state.step < run.total_steps:
        alpha = alpha_at_step(state.step, run.steps_per_epoch, alpha=run.model_config.alpha,
                              ramp_epochs=tc.alpha_ramp_epochs)
        values = train_step(run, batches, step=state.step, epoch=state.epoch, alpha=alpha,
                            last_checkpoint=state.last_checkpoint)
        state.step += 1
        state.step_in_epoch += 1
        progress.update(1)
        state.curve_check.observe(state.step, values)
        _log_step(run, state, logger, values, alpha=alpha, progress=progress, train_started=train_started)
        stop_here = stop_at_step is not None and state.step >= stop_at_step
        signalled = stop_request.agreed(run.ctx.world_size, run.ctx.device)
        _checkpoint_if_due(run, state, force=stop_here or signalled)
        if (stop_here or signalled) and state.step < run.total_steps:
            state.stopped_early, state.stopped_by = True, "stop_at_step" if stop_here else stop_request.signal
            break
    progress.close()
    if state.stopped_early or state.step_in_epoch < run.steps_per_epoch:
        return
    state.epoch, state.step_in_epoch = state.epoch + 1, 0
    every = tc.eval.every_epochs
    if every and state.epoch % every == 0 and state.step < run.total_steps:
        for split in run.eval_splits:
            result = _report_eval_split(run, split)
            logger.log({"kind": "eval", "step": state.step, "epoch": state.epoch, "split": split, **result["headline"]},
                       state.step)


def _log_step(run: TrainingRun, state: LoopState, logger: MetricsLogger, values: dict[str, float], *, alpha: float,
              progress, train_started: float) -> None:
    """Add the step's scalars to the interval; every train.log_every steps (and at the end) log their means."""
    tc = run.config.train
    for name, value in values.items():
        state.interval[name] = state.interval.get(name, 0.0) + value
    state.interval_steps += 1
    if state.step % tc.log_every != 0 and state.step != run.total_steps:
        return
    elapsed = time.perf_counter() - state.interval_start
    pairs_per_step = tc.batch_size * run.ctx.world_size * tc.grad_accum_steps
    record = {"kind": "train", "step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4),
              "alpha": alpha, **{k: v / state.interval_steps for k, v in state.interval.items()},
              "pairs_per_s": pairs_per_step * state.interval_steps / max(elapsed, 1e-9),
              "elapsed_s": time.perf_counter() - train_started}
    state.records.append(record)
    logger.log(record, state.step)
    progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
    state.interval, state.interval_steps, state.interval_start = {}, 0, time.perf_counter()


def _checkpoint_if_due(run: TrainingRun, state: LoopState, *, force: bool) -> None:
    """Write a checkpoint after this step when train.ckpt_every, the end of an epoch or the run asks, or `force`."""
    tc = run.config.train
    end_of_epoch = state.step_in_epoch == run.steps_per_epoch
    want_checkpoint = ((tc.ckpt_every and state.step % tc.ckpt_every == 0)
                       or (end_of_epoch and tc.ckpt_every == 0) or state.step == run.total_steps
                       or force)
    if not want_checkpoint:
        return
    epoch, step_in_epoch = (state.epoch + 1, 0) if end_of_epoch else (state.epoch, state.step_in_epoch)  # resume here
    state.last_checkpoint = save_checkpoint(run.ctx, run.output_dir, model=run.model, optimizer=run.optimizer,
                                            schedule=run.schedule, scaler=run.scaler, step=state.step, epoch=epoch,
                                            step_in_epoch=step_in_epoch, saved_config=run.saved_config,
                                            keep_last=tc.keep_last, extra={DATA_ORDER_KEY: run.data_order},
                                            ignore=state.abandoned)
    state.abandoned = tuple(p for p in state.abandoned if p != state.last_checkpoint)  # overwritten: this run's now


def _report_eval_split(run: TrainingRun, split: str) -> dict:
    """Return the retrieval report of the model on one split of train.eval.splits (all ranks take part)."""
    settings = run.config.train.eval
    dataset = retrieval_split_dataset(run.config, split)
    if run.ctx.is_main:
        print(f"[codis] evaluating retrieval on the {split} split ({split_description(run.config, split)}): "
              f"{len(dataset)} images, {len(dataset.texts)} captions, ITM re-ranking of the top {settings.k_test} ...",
              flush=True)
    return retrieval_report(run.model, run.data.tokenizer, dataset, k=settings.k_test, batch_size=settings.batch_size,
                            pair_batch_size=settings.pair_batch_size, device=run.ctx.device)
