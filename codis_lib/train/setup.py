"""Building a run: data, model (seeded), optimizer, schedule and grad scaler; then wrapping it for the loop.

    ctx = init_distributed("auto")          # codis_lib.train.process: rank, world size, device
    run = build_training_run(config, ctx)   # data, model, AdamW, schedule, grad scaler (seeded)
    ...                                     # load weights (resume or init_from: codis_lib.train.resume), then
    wrap_model(run)                         # DDP, torch.compile, autocast
    print(describe_run(run))                # the one-line summary

The training data is `codis_lib.train.data`'s, the per-step batch handling `codis_lib.train.batches`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codis_lib.config import ModelConfig
from codis_lib.run_config import RunConfig
from codis_lib.train.data import TrainData, build_train_data
from codis_lib.train.process import RunContext, resolve_precision
from codis_lib.train.schedule import WarmupCosineSchedule, build_adamw

__all__ = ["TrainingRun", "build_training_run", "wrap_model", "describe_run", "skipped_records",
           "compile_transformer_blocks"]


@dataclass
class TrainingRun:
    """What `build_training_run` assembles for the loop: the config, this process, data, model and optimizer."""

    config: RunConfig
    ctx: RunContext
    data: TrainData
    model_config: ModelConfig  # config.model with the tokenizer's vocabulary size and special ids
    saved_config: dict  # the run config as checkpoints store it (model section = model_config)
    model: torch.nn.Module  # the CODIS being trained
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosineSchedule
    scaler: torch.amp.GradScaler  # a no-op unless fp16
    autocast_dtype: torch.dtype | None  # None: fp32
    steps_per_epoch: int  # optimizer steps
    total_steps: int  # optimizer steps the schedule spans
    train_model: torch.nn.Module | None = None  # the model, or its DDP wrapper, once `wrap_model` ran
    data_order: dict | None = None  # what the data order and schedule depend on (`train.data_order`), checkpointed
    image_stats: Any = None  # (size, mtime_ns) of each image file (`train.image_files`), measured with data_order
    autocast: Any = None  # the autocast context of every forward, once `wrap_model` ran
    eval_splits: list = field(default_factory=list)  # train.eval.splits less an optional one the corpus lacks

    @property
    def output_dir(self) -> Path:
        return Path(self.config.train.output_dir)


def build_training_run(config: RunConfig, ctx: RunContext) -> TrainingRun:
    """Return the data, model (seeded init), AdamW, warm-up + cosine schedule and grad scaler of a run.

    The model is not wrapped yet: weights are loaded first (resume or init_from), then `wrap_model`.
    """
    from codis_lib.model import build_model
    from codis_lib.model.verify import verify_pretrained

    tc = config.train
    config.validate_for_world(ctx.world_size)
    torch.manual_seed(tc.seed)  # the same seed on every rank: identical initial weights (DDP also broadcasts)
    data = build_train_data(config, ctx)
    model_config: ModelConfig = config.model.with_tokenizer(data.tokenizer)
    saved_config = {**config.to_dict(), "model": model_config.to_dict()}
    model = build_model(model_config)
    # Refuse a model that does not hold every tensor its pretrained sources give (student and teacher),
    # on the CPU copy, before the first step (InitialisationError: one line, exit status 2).
    verify_pretrained(model, model_config)
    model = model.to(ctx.device)
    steps_per_epoch = data.sampler.batches_per_epoch // tc.grad_accum_steps
    total_steps = steps_per_epoch * tc.epochs if tc.max_steps is None else min(tc.max_steps,
                                                                                 steps_per_epoch * tc.epochs)
    opt = tc.optimizer
    optimizer = build_adamw(model, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps,
                            temp_lr=opt.temp_lr)
    schedule = WarmupCosineSchedule(optimizer, total_steps=total_steps, lr=opt.lr, warmup_lr=opt.warmup_lr,
                                    warmup_steps=opt.warmup_steps, min_lr=opt.min_lr,
                                    max_warmup_fraction=opt.max_warmup_fraction)
    autocast_dtype, use_scaler = resolve_precision(tc.precision, ctx.device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    return TrainingRun(config=config, ctx=ctx, data=data, model_config=model_config, saved_config=saved_config,
                       model=model, optimizer=optimizer, schedule=schedule, scaler=scaler,
                       autocast_dtype=autocast_dtype, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def wrap_model(run: TrainingRun) -> None:
    """Set run.train_model (DDP over several processes, else the model) and run.autocast; compile if asked."""
    tc, ctx = run.config.train, run.ctx
    run.train_model = run.model
    if ctx.world_size > 1:
        # Queues stay in sync by construction (every rank enqueues the same gathered features), so
        # buffers need no broadcast at every forward.
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=tc.find_unused_parameters)
    if tc.compile:
        compiled = compile_transformer_blocks(run.model)
        if ctx.is_main:
            print(f"[codis] torch.compile: {compiled} transformer blocks (compiled on first use)", flush=True)
    run.autocast = (torch.autocast(device_type=ctx.device.type, dtype=run.autocast_dtype)
                    if run.autocast_dtype is not None else contextlib.nullcontext())


def describe_run(run: TrainingRun) -> str:
    """Return the one-line summary printed at the start: model, data, batch arithmetic, steps, device, precision.

    Training files cleaned by `codis-check-data` add their manifest (`describe_data_checks`).
    """
    from codis_lib.data.check import describe_data_checks

    tc, ctx, accum = run.config.train, run.ctx, run.config.train.grad_accum_steps
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad) / 1e6
    return (f"[codis] {run.config.source}: {run.model_config.mode} model, {trainable:.2f}M "
            f"trainable parameters, {len(run.data.dataset)} training samples{skipped_records(run.data.dataset)}, "
            f"{ctx.world_size} process(es) x "
            f"batch {tc.batch_size} x {accum} accumulation = {tc.batch_size * ctx.world_size * accum} per step, "
            f"{run.steps_per_epoch} steps/epoch, {run.total_steps} steps, device {ctx.device}"
            + (f" ({torch.get_num_threads()} thread(s))" if ctx.device.type == "cpu" else "")
            + f", precision {run.autocast_dtype or torch.float32}" + describe_data_checks(run.data.data_checks))


def skipped_records(dataset) -> str:
    """Return " (N bad records skipped: reason n, ...)" for a dataset read with data.on_error=skip, else ""."""
    skipped = getattr(dataset, "skipped", None) or {}
    total = sum(skipped.values())
    if not total:
        return ""
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
    return f" ({total} bad record(s) skipped, data.on_error=skip: {reasons})"


def compile_transformer_blocks(model: torch.nn.Module) -> int:
    """Return how many transformer blocks were compiled in place with `torch.compile` (`Module.compile`).

    Compiling block by block (every ViT block and BERT layer, student and teacher) rather than the whole
    forward keeps the model's Python logic (EMA, sampling, queues, collectives) out of the graphs, so
    there are no graph breaks to trip over, and leaves parameter names (checkpoints) unchanged.
    """
    count = 0
    for module in model.modules():
        # A stack of blocks: BERT's encoder.layer (a ModuleList of text and fusion layers) or timm's ViT
        # blocks (a Sequential): >= 2 children, each a layer with its own attention.
        children = list(module.children()) if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) else []
        if len(children) >= 2 and all(any("attn" in name or "attention" in name for name, _ in child.named_children())
                                      for child in children):
            for block in children:
                block.compile()
                count += 1
    return count
