"""The CODIS training loop: one function, `train(config)`, readable top to bottom (nanoGPT's layout).

The same code runs a 2-core laptop, one GPU, or many GPUs under torchrun:

    codis-pretrain                                              # 1 process, tiny model, emoji corpus
    torchrun --nproc_per_node 8 -m codis_lib.train.cli pretrain --config pretrain_4m

What happens, in order:
1. Processes. Under torchrun (WORLD_SIZE > 1) a process group is created (NCCL on GPUs, gloo on CPU)
   and the model is wrapped in DistributedDataParallel; a single process needs no group at all.
2. Data. The emoji corpus is built if missing (rank 0; the others wait). `GlobalBatchSampler` cuts a
   seeded per-epoch permutation into global batches and gives each rank a contiguous slice, and
   `SeededItems` loads item i of epoch e under a seed of (seed, e, i): the global batch, its order and
   every sample's augmentation are the same whatever the number of processes.
3. Model, AdamW (ALBEF's groups), warm-up + cosine schedule, optional fp16 grad scaler. `--resume`
   restores all of it, the RNG states and the position in the epoch from the latest checkpoint.
4. The loop. For each optimizer step: alpha from its ramp; `grad_accum_steps` forwards under autocast
   (bf16 on GPU by default), each with per-sample seeds for the model's own randomness (MLM masking,
   ITM hard negatives); every loss term is averaged over ranks and checked for NaN/inf *before*
   backward (a non-finite term stops the run naming the term and step; no checkpoint is written after
   it); backward (DDP all-reduces gradients on the last micro-batch only); clipping; optimizer and
   schedule step. Rank 0 logs per-term losses, lr, alpha, temperature, throughput and codebook usage
   to metrics.jsonl and TensorBoard, and writes atomic checkpoints.
5. The end. A final checkpoint (`checkpoint_final.pt`) and, if configured, zero-shot / fine-tuned
   retrieval evaluation on the held-out split (ALBEF's protocol, `codis_lib.evaluation.report`).

Retrieval fine-tuning (`train.task: finetune`) is the same loop on the retrieval training records,
with `image_ids` passed to the model (positives share an image id, hard negatives never do) and the
weights initialised from a pretraining checkpoint (`train.init_from`, position embeddings resampled
to the new image size).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from codis_lib import distributed as cdist
from codis_lib.config import ConfigError, ModelConfig
from codis_lib.checkpoint import (FINAL_CHECKPOINT_NAME, CheckpointMismatchError, capture_rng_state, checkpoint_path,
                                  find_latest_checkpoint, link_or_copy, load_checkpoint, load_model_state_strict,
                                  make_checkpoint, prune_checkpoints, restore_training_state, save_atomic)
from codis_lib.data.tokenizer import tokenizer_location
from codis_lib.evaluation.report import retrieval_report, retrieval_split_dataset
from codis_lib.run_config import RunConfig
from codis_lib.train.metrics import LOSS_PREFIX, MetricsLogger
from codis_lib.train.sampler import GlobalBatchSampler, SeededItems, sample_seeds
from codis_lib.train.schedule import WarmupCosineSchedule, alpha_at_step, build_adamw

__all__ = ["train", "TrainResult", "NonFiniteLossError", "RunContext", "init_distributed", "build_train_data",
           "compile_transformer_blocks",
           "load_pretrained_weights", "resolve_precision"]

# Scalar diagnostics of CODISOutput that are averaged over ranks and logged next to the losses.
LOGGED_DIAGNOSTICS = ("temperature", "codebook_perplexity", "dead_codes", "itm_accuracy", "mlm_accuracy")


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term was NaN or infinite; `.term`, `.step`, `.checkpoint` say where."""

    def __init__(self, message: str, *, term: str, step: int, epoch: int, checkpoint: Path | None):
        super().__init__(message)
        self.term, self.step, self.epoch, self.checkpoint = term, step, epoch, checkpoint


@dataclass
class TrainResult:
    """What a run produced: where, how far, the logged records (rank 0) and the evaluation, if any."""

    output_dir: Path
    steps: int  # optimizer steps done (in total, across resumes)
    total_steps: int  # steps the schedule spans
    finished: bool  # reached total_steps (False when stopped early with stop_at_step)
    checkpoint: Path | None  # the last checkpoint written (checkpoint_final.pt when finished)
    records: list[dict] = field(default_factory=list)  # training log records of this invocation (rank 0)
    evaluation: dict | None = None  # retrieval metrics (`RetrievalEvaluation.to_dict()`) when evaluated
    wall_s: float = 0.0
    train_s: float = 0.0
    model: Any = field(default=None, repr=False)  # the trained CODIS (unwrapped from DDP), for notebooks


# ------------------------------------------------------------------------------------------ processes
@dataclass
class RunContext:
    """This process's place in the run: rank, world size, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool  # True when train() created the group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if cdist.is_distributed():
            dist.barrier()


def init_distributed(device_choice: str = "auto") -> RunContext:
    """Return the RunContext, creating the process group when launched by torchrun with WORLD_SIZE > 1.

    NCCL is used on GPUs, gloo on CPU. A group created by the caller beforehand is reused.
    """
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use train.device=cpu or auto")
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not cdist.is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")  # rendezvous from torchrun's env://
        owns = True
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return RunContext(rank=cdist.get_rank(), world_size=cdist.get_world_size(), local_rank=local_rank,
                      device=device, owns_process_group=owns)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Return (autocast dtype or None for fp32, whether a GradScaler is needed) for `train.precision`."""
    if precision == "auto":
        if device.type == "cuda":
            return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
        return None, False
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return torch.float16, True


# ------------------------------------------------------------------------------------------ data
@dataclass
class TrainData:
    """The tokenizer, the (seeded) training set, its sampler and loader."""

    tokenizer: Any
    dataset: Any  # the underlying codis_lib.data dataset
    seeded: SeededItems
    sampler: GlobalBatchSampler
    loader: DataLoader

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Prepare the sampler and the item seeds for `epoch`, skipping its first `start_batch` global batches."""
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_batch(start_batch)
        self.seeded.set_epoch(epoch)


def ensure_emoji_corpus(config: RunConfig, ctx: RunContext) -> Path:
    """Return the emoji corpus directory, building it on rank 0 first when it is missing and allowed."""
    data = config.data
    root = Path(data.root)
    if not (root / "manifest.json").is_file():
        if not data.build_if_missing:
            raise FileNotFoundError(f"no emoji corpus in {root} (data.root) and data.build_if_missing is false; "
                                    f"build it with `codis-build-emoji --out-dir {root}`")
        if ctx.is_main:
            from codis_lib.data.emoji_corpus import build_emoji_corpus

            print(f"[codis] building the emoji corpus in {root} (once; about a minute on 2 cores) ...", flush=True)
            manifest = build_emoji_corpus(root, image_size=data.emoji_image_size, limit=data.emoji_limit)
            counts = manifest["counts"]
            print(f"[codis] emoji corpus: {counts['emoji']} emoji, {counts['images']} images", flush=True)
    ctx.barrier()
    return root


def build_train_data(config: RunConfig, ctx: RunContext) -> TrainData:
    """Return the tokenizer, dataset, sampler and DataLoader of this rank for `config`."""
    from codis_lib.data.collate import ImageTextCollator
    from codis_lib.data.datasets import PretrainDataset, RetrievalTrainDataset
    from codis_lib.data.tokenizer import load_tokenizer

    data, train_config = config.data, config.train
    if data.dataset == "emoji":
        root = ensure_emoji_corpus(config, ctx)
        files = data.train_files or [str(root / ("pretrain.json" if train_config.task == "pretrain" else "train.json"))]
    else:
        files = data.train_files
    tokenizer = load_tokenizer(tokenizer_location(config), max_length=data.max_tokens)
    image_root = data.image_root or None  # None: relative image paths are relative to the JSON file
    dataset_class = PretrainDataset if train_config.task == "pretrain" else RetrievalTrainDataset
    # With the cache every image is decoded (so checked) once; without it, verify the files up front.
    dataset = dataset_class(files, image_root, image_size=config.model.vision.image_size, augment=data.augment,
                            cache=data.cache_images, check_images="exists" if data.cache_images else "verify")
    seeded = SeededItems(dataset, train_config.seed)
    sampler = GlobalBatchSampler(seeded, batch_size=train_config.batch_size, num_replicas=ctx.world_size,
                                 rank=ctx.rank, shuffle=True, seed=train_config.seed,
                                 batches_multiple_of=train_config.grad_accum_steps)
    # The loader's own generator only seeds worker processes; giving it one keeps the global torch
    # stream (dropout) free of the draw a DataLoader iterator makes at every epoch start.
    loader_generator = torch.Generator().manual_seed(train_config.seed)
    loader = DataLoader(seeded, batch_size=train_config.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=ImageTextCollator(tokenizer, max_length=data.max_tokens),
                        num_workers=data.num_workers, pin_memory=ctx.device.type == "cuda",
                        generator=loader_generator, persistent_workers=False)
    return TrainData(tokenizer=tokenizer, dataset=dataset, seeded=seeded, sampler=sampler, loader=loader)


def pad_text_to_global_length(batch: dict, ctx: RunContext) -> dict:
    """Return the batch with input_ids / attention_mask right-padded to the longest caption of the global batch.

    The collator pads each rank's batch to its own longest caption; tensors gathered across ranks
    (text states for ITM negatives) must have one length, and the single-process run pads the whole
    global batch to its longest, so matching it keeps the computation identical.
    """
    if ctx.world_size == 1:
        return batch
    length = torch.tensor([batch["input_ids"].shape[1]], device=batch["input_ids"].device)
    cdist.all_reduce_max_(length)
    missing = int(length) - batch["input_ids"].shape[1]
    if missing > 0:
        batch = dict(batch)
        for key in ("input_ids", "attention_mask"):
            batch[key] = torch.nn.functional.pad(batch[key], (0, missing), value=0)
    return batch


# ------------------------------------------------------------------------------------------ model
def load_pretrained_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Initialise `model` from a CODIS checkpoint (or a bare state dict) for fine-tuning, strictly.

    Differences that fine-tuning expects are adapted and reported: the ViT position embeddings are
    resampled when the image size changed (ALBEF: 256 -> 384 px), and queues of a different length are
    left freshly initialised (they are refilled within queue_size / batch steps). Anything else that
    does not fit raises CheckpointMismatchError listing the keys.
    """
    from codis_lib.model.vit import interpolate_pos_embed

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from: no checkpoint file {path}")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(stored["model"] if isinstance(stored, dict) and "model" in stored else stored)
    own = model.state_dict()
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state and key in own and state[key].shape != own[key].shape:
            num_patches = own[key].shape[1] - 1
            print(f"[codis] {path}: resampling {key} {tuple(state[key].shape)} -> {tuple(own[key].shape)}")
            state[key] = interpolate_pos_embed(state[key], num_patches)
    for key in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        if key in state and key in own and state[key].shape != own[key].shape:
            print(f"[codis] {path}: {key} has shape {tuple(state[key].shape)}, the model {tuple(own[key].shape)}; "
                  f"starting with fresh queues")
            for queue_key in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
                state[queue_key] = own[queue_key]
            break
    load_model_state_strict(model, state, source=str(path))


def _model_config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Return the dotted keys whose values differ between two nested config dicts."""
    keys = sorted(set(saved) | set(current))
    differences = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += _model_config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return differences


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


# ------------------------------------------------------------------------------------------ the loop
def _step_scalars(losses: dict[str, torch.Tensor], total: torch.Tensor, diagnostics: dict,
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
    for name in LOGGED_DIAGNOSTICS:
        value = diagnostics.get(name)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            names.append(name)
            values.append(value.detach().float().reshape(()).to(device))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            names.append(name)
            values.append(torch.tensor(float(value), device=device))
    packed = torch.stack([v.to(device) for v in values]).double()  # (n,)
    if cdist.is_distributed() and cdist.get_world_size() > 1:
        cdist.all_reduce_sum_(packed)
        packed /= cdist.get_world_size()
    return dict(zip(names, packed.tolist()))


RUN_FILES = ("checkpoint_*.pt", "metrics.jsonl", "eval_*.json", "config.yaml")


def _claim_output_dir(output_dir: Path, *, overwrite: bool, ctx: RunContext) -> None:
    """Make sure a fresh run does not mix with an earlier run's files in `output_dir` (deleted if `overwrite`)."""
    import shutil

    previous = sorted(p for pattern in RUN_FILES for p in output_dir.glob(pattern)) if output_dir.is_dir() else []
    if previous and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a run ({', '.join(p.name for p in previous[:4])}"
            f"{', ...' if len(previous) > 4 else ''}). Continue it with --resume (a finished run is just evaluated "
            f"again), start over with --set train.overwrite=true, or pick another --output-dir.")
    ctx.barrier()  # every rank has looked before rank 0 deletes anything
    if previous and ctx.is_main:
        print(f"[codis] train.overwrite: removing the previous run's files in {output_dir}", flush=True)
        for path in previous:
            path.unlink()
        shutil.rmtree(output_dir / "tensorboard", ignore_errors=True)
    ctx.barrier()


def _save(ctx: RunContext, output_dir: Path, *, model, optimizer, schedule, scaler, step: int, epoch: int,
          step_in_epoch: int, saved_config: dict, keep_last: int) -> Path:
    """Write the checkpoint of `step` (rank 0; RNG states gathered from every rank) and return its path."""
    rng = capture_rng_state()
    if cdist.is_distributed() and ctx.world_size > 1:
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    path = checkpoint_path(output_dir, step)
    if ctx.is_main:
        save_atomic(make_checkpoint(model=model, optimizer=optimizer, scheduler=schedule, scaler=scaler, step=step,
                                    epoch=epoch, step_in_epoch=step_in_epoch, config=saved_config,
                                    rng_states=gathered, world_size=ctx.world_size), path)
        prune_checkpoints(output_dir, keep_last)
    ctx.barrier()
    return path


def train(config: RunConfig, *, resume: bool | str | os.PathLike = False, stop_at_step: int | None = None,
          evaluate: bool | None = None) -> TrainResult:
    """Return the TrainResult of running `config` (see the module docstring for the whole sequence).

    resume: False, True (the latest checkpoint in train.output_dir, starting fresh if there is none),
    or the path of a checkpoint. stop_at_step: save a checkpoint and return after this optimizer step
    (to split a long run over several jobs; the schedule still spans the whole run). evaluate:
    override train.eval.at_end.
    """
    ctx = init_distributed(config.train.device)
    threads_before = torch.get_num_threads()
    if config.train.num_threads is not None:
        torch.set_num_threads(config.train.num_threads)
    try:
        return _train(config, ctx, resume=resume, stop_at_step=stop_at_step, evaluate=evaluate)
    finally:
        torch.set_num_threads(threads_before)  # a notebook or test session goes on with its own setting
        if ctx.owns_process_group:
            dist.destroy_process_group()


def _train(config: RunConfig, ctx: RunContext, *, resume, stop_at_step, evaluate) -> TrainResult:
    started = time.perf_counter()
    tc = config.train
    config.validate_for_world(ctx.world_size)
    output_dir = Path(tc.output_dir)
    torch.manual_seed(tc.seed)  # the same seed on every rank: identical initial weights (DDP also broadcasts)

    # ---- data, model, optimizer
    data = build_train_data(config, ctx)
    model_config: ModelConfig = config.model.with_tokenizer(data.tokenizer)
    saved_config = {**config.to_dict(), "model": model_config.to_dict()}
    from codis_lib.model import build_model

    model = build_model(model_config).to(ctx.device)
    accum = tc.grad_accum_steps
    steps_per_epoch = data.sampler.batches_per_epoch // accum
    total_steps = steps_per_epoch * tc.epochs if tc.max_steps is None else min(tc.max_steps,
                                                                                 steps_per_epoch * tc.epochs)
    opt = tc.optimizer
    optimizer = build_adamw(model, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps)
    schedule = WarmupCosineSchedule(optimizer, total_steps=total_steps, lr=opt.lr, warmup_lr=opt.warmup_lr,
                                    warmup_steps=opt.warmup_steps, min_lr=opt.min_lr,
                                    max_warmup_fraction=opt.max_warmup_fraction)
    autocast_dtype, use_scaler = resolve_precision(tc.precision, ctx.device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    # ---- where to start: a checkpoint of this run, a pretraining checkpoint, or scratch
    step, epoch, step_in_epoch = 0, 0, 0
    resume_path = None
    if resume:
        resume_path = Path(resume) if not isinstance(resume, bool) else find_latest_checkpoint(output_dir)
        if resume_path is None and ctx.is_main:
            print(f"[codis] --resume: no checkpoint in {output_dir}; starting from scratch", flush=True)
    if resume_path is None:
        _claim_output_dir(output_dir, overwrite=tc.overwrite, ctx=ctx)
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, map_location=ctx.device)
        differences = _model_config_differences(checkpoint["config"]["model"], model_config.to_dict())
        if differences:
            raise CheckpointMismatchError(f"{resume_path} was trained with another model config:\n  "
                                          + "\n  ".join(differences))
        restore_training_state(checkpoint, model=model, optimizer=optimizer, scheduler=schedule, scaler=scaler,
                               rank=ctx.rank, world_size=ctx.world_size, source=str(resume_path))
        step, epoch, step_in_epoch = checkpoint["step"], checkpoint["epoch"], checkpoint["step_in_epoch"]
        if ctx.is_main:
            print(f"[codis] resumed from {resume_path}: step {step}, epoch {epoch}, step {step_in_epoch} of the epoch",
                  flush=True)
        del checkpoint
    elif tc.init_from:
        load_pretrained_weights(model, tc.init_from)

    train_model = model
    if ctx.world_size > 1:
        # Queues stay in sync by construction (every rank enqueues the same gathered features), so
        # buffers need no broadcast at every forward.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=tc.find_unused_parameters)
    if tc.compile:
        compiled = compile_transformer_blocks(model)
        if ctx.is_main:
            print(f"[codis] torch.compile: {compiled} transformer blocks (compiled on first use)", flush=True)
    autocast = (torch.autocast(device_type=ctx.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    logger = MetricsLogger(output_dir, enabled=ctx.is_main, tensorboard=tc.tensorboard)
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml())
        data.tokenizer.save_pretrained(str(output_dir / "tokenizer"))  # the run folder is self-contained
        print(f"[codis] {config.source}: {model_config.mode} model, {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M "
              f"trainable parameters, {len(data.dataset)} training samples, {ctx.world_size} process(es) x "
              f"batch {tc.batch_size} x {accum} accumulation = {tc.batch_size * ctx.world_size * accum} per step, "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps, device {ctx.device}, "
              f"precision {autocast_dtype or torch.float32}", flush=True)

    # ---- the loop
    from tqdm import tqdm

    model.train()
    records: list[dict] = []
    interval: dict[str, float] = {}
    interval_steps, interval_start = 0, time.perf_counter()
    last_checkpoint = find_latest_checkpoint(output_dir) if resume_path is not None else None
    pairs_per_step = tc.batch_size * ctx.world_size * accum
    stopped_early = False
    train_started = time.perf_counter()
    try:
        while step < total_steps:
            data.set_epoch(epoch, start_batch=step_in_epoch * accum)
            batches = iter(data.loader)
            progress = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{tc.epochs}",
                            disable=not (ctx.is_main and tc.progress), dynamic_ncols=True, leave=False)
            while step_in_epoch < steps_per_epoch and step < total_steps:
                alpha = alpha_at_step(step, steps_per_epoch, alpha=model_config.alpha, ramp_epochs=tc.alpha_ramp_epochs)
                step_values: dict[str, float] = {}
                for micro_step in range(accum):
                    batch = pad_text_to_global_length(next(batches), ctx)
                    image = batch["image"].to(ctx.device, non_blocking=True)
                    input_ids = batch["input_ids"].to(ctx.device, non_blocking=True)
                    attention_mask = batch["attention_mask"].to(ctx.device, non_blocking=True)
                    image_ids = batch["image_ids"].to(ctx.device) if tc.task == "finetune" else None
                    seeds = sample_seeds(tc.seed, epoch, batch["index"])  # (B,) from (seed, epoch, dataset index)
                    last_micro_step = micro_step == accum - 1
                    # DDP all-reduces gradients in backward; skip that on all but the last micro-batch.
                    no_sync = train_model.no_sync() if (ctx.world_size > 1 and not last_micro_step
                                                         and hasattr(train_model, "no_sync")) else contextlib.nullcontext()
                    with no_sync:
                        with autocast:
                            output = train_model(image, input_ids, attention_mask, alpha=alpha, image_ids=image_ids,
                                                 sample_seeds=seeds)
                        losses, total_loss = dict(output.losses), output.loss
                        values = _step_scalars(losses, total_loss, output.diagnostics, ctx.device)
                        bad = [name for name, value in values.items()
                               if (name.startswith(LOSS_PREFIX) or name == "loss") and not math.isfinite(value)]
                        if bad:
                            term = next((n[len(LOSS_PREFIX):] for n in bad if n.startswith(LOSS_PREFIX)), "total")
                            listing = ", ".join(f"{n}={values[n]}" for n in bad)
                            where = (f"the last good checkpoint is {last_checkpoint} (resume with --resume)"
                                     if last_checkpoint is not None else "no checkpoint had been written yet")
                            raise NonFiniteLossError(
                                f"non-finite loss term '{term}' at step {step + 1} (epoch {epoch}, alpha {alpha:.3f}, "
                                f"lr {schedule.current_lr():.3g}): {listing}. Training stopped before the update; "
                                f"{where}.", term=term, step=step + 1, epoch=epoch, checkpoint=last_checkpoint)
                        scaler.scale(total_loss / accum).backward()
                    for name, value in values.items():
                        step_values[name] = step_values.get(name, 0.0) + value / accum
                if opt.clip_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad_norm)
                    step_values["grad_norm"] = float(grad_norm)
                step_values["lr"] = schedule.current_lr()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                step += 1
                step_in_epoch += 1
                progress.update(1)

                for name, value in step_values.items():
                    interval[name] = interval.get(name, 0.0) + value
                interval_steps += 1
                if step % tc.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - interval_start
                    record = {"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
                              "alpha": alpha, **{k: v / interval_steps for k, v in interval.items()},
                              "pairs_per_s": pairs_per_step * interval_steps / max(elapsed, 1e-9),
                              "elapsed_s": time.perf_counter() - train_started}
                    records.append(record)
                    logger.log(record, step)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                    interval, interval_steps, interval_start = {}, 0, time.perf_counter()

                end_of_epoch = step_in_epoch == steps_per_epoch
                position = (epoch + 1, 0) if end_of_epoch else (epoch, step_in_epoch)  # where a resume starts
                want_checkpoint = ((tc.ckpt_every and step % tc.ckpt_every == 0)
                                   or (end_of_epoch and tc.ckpt_every == 0) or step == total_steps
                                   or (stop_at_step is not None and step >= stop_at_step))
                if want_checkpoint:
                    last_checkpoint = _save(ctx, output_dir, model=model, optimizer=optimizer, schedule=schedule,
                                            scaler=scaler, step=step, epoch=position[0], step_in_epoch=position[1],
                                            saved_config=saved_config, keep_last=tc.keep_last)
                if stop_at_step is not None and step >= stop_at_step and step < total_steps:
                    stopped_early = True
                    break
            progress.close()
            if stopped_early:
                break
            if step_in_epoch == steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
                every = tc.eval.every_epochs
                if every and epoch % every == 0 and step < total_steps:
                    result = _report_eval_split(config, model, data.tokenizer, ctx)
                    eval_record = {"kind": "eval", "step": step, "epoch": epoch, **result["headline"]}
                    logger.log(eval_record, step)
    finally:
        logger.close()
    train_s = time.perf_counter() - train_started

    # ---- the end: final checkpoint and evaluation
    finished = step >= total_steps
    evaluation = None
    if finished:
        if ctx.is_main and last_checkpoint is not None:
            link_or_copy(last_checkpoint, output_dir / FINAL_CHECKPOINT_NAME)
            last_checkpoint = output_dir / FINAL_CHECKPOINT_NAME
        ctx.barrier()
        if tc.eval.at_end if evaluate is None else evaluate:
            evaluation = _report_eval_split(config, model, data.tokenizer, ctx)
            if ctx.is_main:
                logger = MetricsLogger(output_dir, enabled=True, tensorboard=tc.tensorboard)
                logger.log({"kind": "eval", "step": step, "split": tc.eval.split, **evaluation["headline"]}, step)
                logger.close()
                (output_dir / f"eval_{tc.eval.split}.json").write_text(json.dumps(evaluation, indent=2))
    return TrainResult(output_dir=output_dir, steps=step, total_steps=total_steps, finished=finished,
                       checkpoint=last_checkpoint, records=records, evaluation=evaluation,
                       wall_s=time.perf_counter() - started, train_s=train_s, model=model)


def _report_eval_split(config: RunConfig, model, tokenizer, ctx: RunContext) -> dict:
    """Return the retrieval report of `model` on train.eval.split (all ranks take part)."""
    settings = config.train.eval
    dataset = retrieval_split_dataset(config, settings.split)
    if ctx.is_main:
        print(f"[codis] evaluating retrieval on the {settings.split} split: {len(dataset)} images, "
              f"{len(dataset.texts)} captions, ITM re-ranking of the top {settings.k_test} ...", flush=True)
    return retrieval_report(model, tokenizer, dataset, k=settings.k_test, batch_size=settings.batch_size,
                            pair_batch_size=settings.pair_batch_size, device=ctx.device)
