"""Everything the training loop needs before its first step: processes, precision, data, model, optimizer.

    ctx = init_distributed("auto")          # rank, world size, device; a process group under torchrun
    run = build_training_run(config, ctx)   # data, model, AdamW, schedule, grad scaler (seeded)
    ...                                     # load weights (resume or init_from), then
    wrap_model(run)                         # DDP, torch.compile, autocast

Data order and per-sample randomness do not depend on the number of processes (see
`codis_lib.train.sampler`); `pad_text_to_global_length` keeps the text tensors of every rank one length.
The model config's teacher views (`teacher_view_inputs`) decide whether the items carry the teacher's
own image and caption, which `teacher_batch_inputs` hands to the model.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from codis_lib import distributed as cdist
from codis_lib.config import ConfigError, ModelConfig
from codis_lib.data.tokenizer import tokenizer_location
from codis_lib.run_config import RunConfig
from codis_lib.train.sampler import GlobalBatchSampler, SeededItems
from codis_lib.train.schedule import WarmupCosineSchedule, build_adamw

__all__ = ["RunContext", "init_distributed", "resolve_precision", "TrainData", "ensure_emoji_corpus",
           "build_train_data", "teacher_view_inputs", "teacher_batch_inputs", "pad_text_to_global_length",
           "TrainingRun", "build_training_run", "resolve_num_threads", "idle_cores", "wrap_model", "describe_run", "compile_transformer_blocks",
           "model_config_differences"]


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
        raise ConfigError("train.device: 'cuda', but no CUDA device is visible; use train.device=cpu or auto")
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


def idle_cores(interval_s: float = 0.5) -> float | None:
    """Return how many CPU cores were idle over the next `interval_s` seconds (Linux /proc/stat), or None.

    Measured now rather than read from the load average, which still counts a job that just ended
    (a package install right before the first run, for instance).
    """
    import time

    def sample() -> tuple[float, float]:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # total, idle + iowait

    try:
        total_0, idle_0 = sample()
        time.sleep(interval_s)
        total_1, idle_1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (idle_1 - idle_0) / max(total_1 - total_0, 1e-9)


def resolve_num_threads(setting: int | str | None, max_auto: int = 4) -> int | None:
    """Return the torch thread count for train.num_threads: a number as given, None as None, "auto" measured.

    "auto": the idle cores now (rounded, at least 1, at most `max_auto`); on a 2-core machine with
    nothing else running that is 2, which made the tiny recipe's steps 1.5x faster than 1 thread, while
    a busy machine gets 1 (a second thread spinning against another job was up to 10x slower).
    Without /proc/stat: the load average's idle cores.
    """
    if setting != "auto":
        return setting
    idle = idle_cores()
    if idle is None:
        try:
            idle = (os.cpu_count() or 1) - os.getloadavg()[0]
        except OSError:
            idle = 1.0
    return max(1, min(int(idle + 0.5), max_auto))


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
    files: list[str] = field(default_factory=list)  # the training JSON files the dataset was read from
    data_checks: list[dict] = field(default_factory=list)  # `codis-check-data` manifests beside those files

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
        elif ctx.is_main and not (root / "new_style_manifest.json").is_file():
            from codis_lib.data.emoji_new_style import ensure_new_style

            ensure_new_style(root)  # a corpus built before the held-out style existed, or before the font was
    ctx.barrier()
    return root


def build_train_data(config: RunConfig, ctx: RunContext) -> TrainData:
    """Return the tokenizer, dataset, sampler and DataLoader of this rank for `config`."""
    from codis_lib.data.check import data_check_of
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
    own_image, other_caption = teacher_view_inputs(config.model)
    # With the cache every image is decoded (so checked) once; without it, verify the files up front.
    try:
        dataset = dataset_class(files, image_root, image_size=config.model.vision.image_size, augment=data.augment,
                                augmentation=augmentation_options(data),
                                cache=data.cache_images, check_images="exists" if data.cache_images else "verify",
                                on_error=data.on_error,
                                teacher_image=own_image, teacher_caption=other_caption)
    except UnicodeDecodeError as error:  # the reader's message does not say which file
        raise _not_utf8(files, error) from error
    seeded = SeededItems(dataset, train_config.seed)
    try:
        sampler = GlobalBatchSampler(seeded, batch_size=train_config.batch_size, num_replicas=ctx.world_size,
                                     rank=ctx.rank, shuffle=True, seed=train_config.seed,
                                     batches_multiple_of=train_config.grad_accum_steps)
    except ValueError as error:  # a batch larger than the dataset
        raise ConfigError(f"train.batch_size: the training {error} ({', '.join(map(str, files))})") from error
    # The loader's own generator only seeds worker processes; giving it one keeps the global torch
    # stream (dropout) free of the draw a DataLoader iterator makes at every epoch start.
    loader_generator = torch.Generator().manual_seed(train_config.seed)
    loader = DataLoader(seeded, batch_size=train_config.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=ImageTextCollator(tokenizer, max_length=data.max_tokens),
                        num_workers=data.num_workers, pin_memory=ctx.device.type == "cuda",
                        generator=loader_generator, persistent_workers=False)
    checks = [check for check in map(data_check_of, files) if check is not None]
    return TrainData(tokenizer=tokenizer, dataset=dataset, seeded=seeded, sampler=sampler, loader=loader,
                     files=[str(f) for f in files], data_checks=checks)


def _not_utf8(files: list[str], error: UnicodeDecodeError) -> ValueError:
    """Return the one-line error naming the first of `files` that is not UTF-8 text (read only on this error path)."""
    for path in files:
        try:
            Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as bad:
            return ValueError(f"{path}: not UTF-8 text (byte {bad.start}: {bad.reason}); JSON files must be UTF-8")
        except OSError:
            continue
    return ValueError(f"{', '.join(map(str, files))}: not UTF-8 text ({error.reason})")


# The (ids, mask) pairs of a batch: the student's captions, and the teacher's when it reads other ones.
_TEXT_KEYS = (("input_ids", "attention_mask"), ("teacher_input_ids", "teacher_attention_mask"))


def augmentation_options(data) -> dict[str, Any]:
    """Return the data section's augmentation keys as the dataset's ``augmentation`` argument."""
    return {"crop_scale": tuple(data.crop_scale) if data.crop_scale is not None else None,
            "randaugment_ops": data.randaugment_ops, "randaugment_magnitude": data.randaugment_magnitude}


def teacher_view_inputs(model_config: ModelConfig) -> tuple[bool, bool]:
    """Return (own image, other caption): the second inputs the training data carries for the momentum teacher.

    Set by `teacher_view: own` and `teacher_text_view: other_caption`; never in clip mode (no teacher).
    """
    return (model_config.uses_teacher and model_config.teacher_view == "own",
            model_config.uses_teacher and model_config.teacher_text_view == "other_caption")


def teacher_batch_inputs(batch: dict, model_config: ModelConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Return the forward's teacher keywords (image_teacher, teacher_input_ids, ...) on `device`; {} for "same".

    Raises KeyError naming the missing batch keys when the model config asks for a view the batch lacks.
    """
    own_image, other_caption = teacher_view_inputs(model_config)
    keys = (["image_teacher"] if own_image else []) + (list(_TEXT_KEYS[1]) if other_caption else [])
    missing = [key for key in keys if key not in batch]
    if missing:
        raise KeyError(f"the model config's teacher_view / teacher_text_view needs batch key(s) {', '.join(missing)}, "
                       f"which this batch lacks (a loader built for another config?)")
    return {key: batch[key].to(device, non_blocking=True) for key in keys}


def pad_text_to_global_length(batch: dict, ctx: RunContext) -> dict:
    """Return the batch with input_ids / attention_mask right-padded to the longest caption of the global batch.

    The collator pads each rank's batch to its own longest caption; tensors gathered across ranks
    (text states for ITM negatives) must have one length, and the single-process run pads the whole
    global batch to its longest, so matching it keeps the computation identical. The teacher's
    captions (teacher_input_ids / teacher_attention_mask), when the batch has them, are padded to
    their own global longest the same way (one all-reduce for both).
    """
    if ctx.world_size == 1:
        return batch
    pairs = [pair for pair in _TEXT_KEYS if pair[0] in batch]
    lengths = [batch[ids].shape[1] for ids, _ in pairs]
    longest = torch.tensor(lengths, device=batch["input_ids"].device)
    cdist.all_reduce_max_(longest)
    padded = dict(batch)
    for (ids, mask), length, target in zip(pairs, lengths, longest.tolist()):
        if target > length:
            for key in (ids, mask):
                padded[key] = torch.nn.functional.pad(batch[key], (0, target - length), value=0)
    return padded


# ------------------------------------------------------------------------------------------ model, optimizer
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


def model_config_differences(saved: dict, current: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Return the dotted keys whose values differ between two nested config dicts (a resume must match).

    A key the saved config lacks (a checkpoint written before that option existed) counts as its default
    value, `ModelConfig()`'s at the top level: the older code behaved as the default does.
    """
    if defaults is None and not prefix:
        defaults = ModelConfig().to_dict()
    defaults = defaults or {}
    keys = sorted(set(saved) | set(current))
    differences = []
    for key in keys:
        a, b = saved.get(key, defaults.get(key)), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            nested = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
            differences += model_config_differences(a, b, f"{prefix}{key}.", nested)
        elif a != b:
            differences.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return differences
