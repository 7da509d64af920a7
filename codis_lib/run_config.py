"""Typed configuration of a training run: `RunConfig` = {model: ModelConfig, data: DataConfig, train: TrainConfig}.

A run is described by one YAML file with three sections (see codis_lib/configs/pretrain_*.yaml):

    model:                 # codis_lib.config.ModelConfig; `preset: tiny` then per-key overrides
      preset: tiny
      queue_size: 1024
    data:                  # DataConfig: which corpus, where, tokenizer, augmentation, caching
      dataset: emoji
    train:                 # TrainConfig: optimisation, precision, logging, checkpoints, evaluation
      batch_size: 32

    >>> run = load_run_config("pretrain_emoji")            # a packaged config, by name or path
    >>> run = load_run_config("my.yaml", overrides=["train.batch_size=8", "model.mode=albef"])

Loading is strict, as the model config's (both go through `codis_lib.typed_config`): unknown keys
are listed with the valid ones, wrong types and impossible values name the dotted key and the file.
Overrides (`--set key=value` on the command line) are applied to the raw YAML before validation; each
value is parsed as YAML (`8` is an int, `1e-4` a float, `true` a bool, `null` None, `[a, b]` a list),
so they obey the same checks as the file.
The queue length must be a multiple of the global batch (batch per process x processes): that is
checked here when the number of processes is known (`WORLD_SIZE`, set by torchrun) and again by the
trainer.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from codis_lib.config import CONFIG_DIR, ModelConfig, config_from_dict
from codis_lib.typed_config import ConfigError, build_dataclass, read_yaml_mapping, yaml_problem

__all__ = ["OptimizerConfig", "DataConfig", "EvalConfig", "TrainConfig", "RunConfig", "ConfigError",
           "load_run_config", "run_config_from_dict", "without_retired_keys", "parse_overrides", "apply_overrides",
           "resolve_config_path", "run_config_names", "EMOJI_EVAL_SPLITS", "ALBEF_JSON_EVAL_FILES",
           "eval_split_names", "eval_split_errors", "STYLE_VARIANT_NAMES", "style_variant_errors"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (ALBEF: lr 1e-4, wd 0.02, warm-up 1e-5 over 2000 steps, cosine to 1e-5)."""

    lr: float = 1e-4  # peak learning rate, reached at the end of the warm-up
    weight_decay: float = 0.02  # not applied to biases and 1-d parameters (ALBEF's groups)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_lr: float = 1e-5  # learning rate at step 0
    warmup_steps: int = 2000  # linear warm-up length in optimizer steps ...
    max_warmup_fraction: float = 0.1  # ... but at most this fraction of the run (tiny runs)
    min_lr: float = 1e-5  # end of the cosine
    clip_grad_norm: float | None = None  # max global gradient norm; None = no clipping (ALBEF clips nothing)
    temp_lr: float | None = None  # None: the temperature trains at lr; a number: its own group, this peak lr


@dataclass
class DataConfig:
    """Where the image-text pairs come from and how they are turned into batches."""

    # "emoji": the offline emoji corpus (built by codis_lib.data.emoji_corpus when missing);
    # "albef_json": ALBEF's JSON lists (pretraining: [{image, caption}], retrieval: coco/flickr files).
    dataset: Literal["emoji", "albef_json"] = "emoji"
    root: str = "data/emoji"  # emoji corpus directory (relative paths are relative to the working directory)
    build_if_missing: bool = True  # emoji only: build the corpus into `root` when it is not there
    emoji_limit: int | None = None  # emoji only: build just the first N emoji (fast tests)
    emoji_image_size: int = 64  # emoji only: pixel size of the stored artwork
    train_files: list[str] = field(default_factory=list)  # JSON lists; empty = the emoji corpus's own file
    val_file: str | None = None  # retrieval JSON (image, caption list); None = the emoji val split
    test_file: str | None = None  # retrieval JSON; None = the emoji test split
    image_root: str = ""  # prefix of the image paths in the JSON files
    tokenizer: str | None = None  # tokenizer directory or hub name; None = <root>/tokenizer (emoji)
    max_tokens: int = 25  # ALBEF: 25 in pretraining, 30 in retrieval fine-tuning
    augment: bool = True  # RandomResizedCrop + flip + RandAugment (ALBEF); off = resize only
    crop_scale: list[float] | None = None  # RandomResizedCrop area range; None = ALBEF's (0.2-1 pretrain, 0.5-1 fine-tune)
    randaugment_ops: int = 2  # RandAugment ops per image (ALBEF: 2); 0 = off
    randaugment_magnitude: float = 7  # RandAugment magnitude (ALBEF: 7)
    # Pretraining's "training variety": every training image also shown re-drawn in each of these styles
    # (STYLE_VARIANT_NAMES; codis_lib.data.style_variants), fixed per image so the trunk's map cache still hits.
    style_variants: list[str] = field(default_factory=list)
    cache_images: bool = True  # keep decoded images in memory (the emoji corpus fits easily)
    # A bad training record (missing or undecodable image, empty caption): "raise" stops with its file and
    # index; "skip" drops it, counts it by reason and reports the count in the run's start line (the 4M lists
    # always miss some images). Evaluation splits are always read strictly.
    on_error: Literal["raise", "skip"] = "raise"
    num_workers: int = 0  # DataLoader worker processes per rank


# The evaluation splits a run may name in train.eval.splits. Emoji: the files of the corpus
# (codis_lib.data.emoji_split_file; tests/test_train_config.py checks the two lists agree).
# ALBEF JSON: the data key holding each split's file.
EMOJI_EVAL_SPLITS = ("val", "test", "new_drawings", "new_style", "new_style_test")
# The styles data.style_variants may name: codis_lib.data.style_variants.STYLE_VARIANTS, kept here below the
# data layer (tests/test_data_style_variants.py checks the two lists agree).
STYLE_VARIANT_NAMES = ("grayscale", "hue", "outline", "flat", "background")
ALBEF_JSON_EVAL_FILES = {"val": "val_file", "test": "test_file"}


@dataclass
class EvalConfig:
    """Zero-shot (or fine-tuned) retrieval evaluation after training (ALBEF protocol), on one or more splits."""

    at_end: bool = True  # evaluate every split in `splits` when training finishes
    every_epochs: int = 0  # also evaluate every N epochs (0 = never during training)
    # Evaluated in this order, each written to eval_<split>.json. Emoji: val, test (concepts never seen in
    # training), new_drawings (new drawings of training concepts); albef_json: val, test (data.val_file,
    # data.test_file). Older configs and checkpoints say `split: test`, read as [test].
    splits: list[str] = field(default_factory=lambda: ["test"])
    k_test: int = 128  # candidates re-ranked with ITM per query (ALBEF: 256 COCO, 128 Flickr30K)
    batch_size: int = 64  # images / captions per feature batch
    pair_batch_size: int = 256  # (image, caption) pairs per ITM re-ranking batch


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpointing of one run."""

    task: Literal["pretrain", "finetune"] = "pretrain"
    batch_size: int = 64  # samples per process per forward (global batch = batch_size x processes)
    epochs: int = 30
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule spans min(epochs, max_steps))
    grad_accum_steps: int = 1  # forwards per optimizer step (effective batch = global batch x this)
    alpha_ramp_epochs: float = 1.0  # alpha goes linearly 0 -> model.alpha over this many epochs (ALBEF: 1)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile every transformer block (worth it on GPUs for long runs)
    # Gradient checkpointing is a model setting (model.gradient_checkpointing: true), not repeated here.
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads per process on CPU: a number, "auto" (the cores idle at the start, measured over
    # half a second, at most 4: see codis_lib.train.process.resolve_num_threads) or None (torch's default)
    num_threads: int | Literal["auto"] | None = None
    output_dir: str = "runs/pretrain"
    overwrite: bool = False  # a fresh (not resumed) run may delete an earlier run's checkpoints and logs there
    init_from: str | None = None  # fine-tuning: a pretraining checkpoint to start from (weights only)
    log_every: int = 10  # optimizer steps between log records (JSON lines + TensorBoard)
    ckpt_every: int = 0  # optimizer steps between checkpoints (0 = at the end of every epoch only)
    keep_last: int = 2  # numbered checkpoints kept on disk (0 = all)
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar on rank 0
    find_unused_parameters: bool = False  # DDP: needed only when a loss switch leaves modules unused
    # The early loss curve is compared with a measured reference (codis_lib.train.reference): "auto" = the
    # packaged config's codis_lib/configs/reference/<name>.json, a path = that file, null = no check.
    reference_curves: str | None = "auto"
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class RunConfig:
    """A whole run: the model, the data and the training recipe."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = "<dict>"  # where this config was read from (for messages)

    def to_dict(self) -> dict[str, Any]:
        """Return a plain nested dict (YAML/JSON/checkpoint friendly) that `run_config_from_dict` reads back."""
        return {"model": self.model.to_dict(), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}

    def to_yaml(self) -> str:
        """Return this config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> "RunConfig":
        """Return a validated copy with `key=value` strings or a {dotted key: value} mapping applied."""
        data = apply_overrides(self.to_dict(), overrides)
        return run_config_from_dict(data, source=f"{self.source} + overrides")

    def validate_for_world(self, world_size: int) -> "RunConfig":
        """Return self after checking the batch-dependent constraints for `world_size` processes."""
        global_batch = self.train.batch_size * world_size
        try:
            self.model.validate_for_batch(global_batch)
        except ConfigError as error:
            raise ConfigError(f"{self.source}: model.{error} (train.batch_size={self.train.batch_size} x "
                              f"{world_size} process(es))") from error
        return self


# ---------------------------------------------------------------------- loading
def run_config_names() -> list[str]:
    """Return the names of the packaged run configs (codis_lib/configs/pretrain_*.yaml, finetune_*.yaml)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem.startswith(("pretrain_", "finetune_")))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """Return the YAML file for a packaged config name ("pretrain_emoji") or an existing path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.exists():
        return packaged
    raise ConfigError(f"unknown config {str(name_or_path)!r}: not a file, and not a packaged config "
                      f"({', '.join(run_config_names())})")


def load_run_config(name_or_path: str | os.PathLike = "pretrain_emoji",
                    overrides: Sequence[str] | Mapping[str, Any] | None = None,
                    world_size: int | None = None) -> RunConfig:
    """Return the validated RunConfig of a YAML file (or packaged config name) with `overrides` applied.

    `world_size` (default: the WORLD_SIZE environment variable torchrun sets, else 1) is used to check
    that the queue length is a multiple of the global batch.
    """
    path = resolve_config_path(name_or_path)
    data = apply_overrides(read_yaml_mapping(path), overrides or [])
    config = run_config_from_dict(data, source=str(path))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return config.validate_for_world(world_size)


# Options that earlier versions had and that checkpoints written by them still store.
RETIRED_KEYS: dict[str, tuple[str, ...]] = {"train": ("debug_nan_at_step", "debug_nan_term")}


# Options renamed since earlier versions, old dotted key -> new one; the old name still loads (checkpoints
# and configs written before the rename store it), silently, with its value read in the new form.
RENAMED_KEYS: dict[str, str] = {"train.eval.split": "train.eval.splits"}


def _with_eval_splits(train: Any, source: str) -> Any:
    """Return the train section with `eval.split: NAME` (the older one-split key) read as `eval.splits: [NAME]`.

    A bare name given to `eval.splits` is a one-name list too (`--set train.eval.splits=test`).
    """
    if not isinstance(train, Mapping) or not isinstance(train.get("eval"), Mapping):
        return train
    settings = dict(train["eval"])
    if "split" in settings:
        if "splits" in settings:
            raise ConfigError(f"{source}: train.eval.split and train.eval.splits are both set; keep "
                              f"train.eval.splits (split is its older one-name form)")
        settings["splits"] = settings.pop("split")
    if isinstance(settings.get("splits"), str):
        settings["splits"] = [settings["splits"]]
    return {**train, "eval": settings}


def without_retired_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of a stored run config without the RETIRED_KEYS, so older checkpoints still load strictly."""
    result = dict(data)
    for section, keys in RETIRED_KEYS.items():
        if isinstance(result.get(section), Mapping):
            result[section] = {key: value for key, value in result[section].items() if key not in keys}
    return result


def run_config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    """Return a validated RunConfig from a nested mapping with sections model, data, train."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a run config must be a mapping with sections model, data, train; "
                          f"got {type(data).__name__}")
    sections = ("model", "data", "train")
    unknown = [key for key in data if key not in sections]
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(map(str, unknown))}; valid sections: "
                          f"{', '.join(sections)}")
    if "model" not in data:
        raise ConfigError(f"{source}: missing section 'model' (e.g. `model: {{preset: tiny}}`)")
    model = config_from_dict(data["model"] or {}, source=f"{source} [model]")
    data_config = build_dataclass(DataConfig, data.get("data") or {}, source, "data.")
    train_config = build_dataclass(TrainConfig, _with_eval_splits(data.get("train") or {}, source), source, "train.")
    config = RunConfig(model=model, data=data_config, train=train_config, source=source)
    _validate_values(config)
    return config


def _validate_values(config: RunConfig) -> None:
    """Raise ConfigError listing every out-of-range value of the data and train sections."""
    errors: list[str] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            errors.append(f"{key}: {message}")

    t, d, o, e = config.train, config.data, config.train.optimizer, config.train.eval
    for key, value in (("train.batch_size", t.batch_size), ("train.epochs", t.epochs),
                       ("train.grad_accum_steps", t.grad_accum_steps), ("train.log_every", t.log_every),
                       ("data.max_tokens", d.max_tokens), ("data.emoji_image_size", d.emoji_image_size),
                       ("train.eval.k_test", e.k_test), ("train.eval.batch_size", e.batch_size),
                       ("train.eval.pair_batch_size", e.pair_batch_size)):
        need(value >= 1, key, f"must be >= 1, got {value}")
    for key, value in (("train.max_steps", t.max_steps), ("data.emoji_limit", d.emoji_limit),
                       ("train.num_threads", None if t.num_threads == "auto" else t.num_threads)):
        need(value is None or value >= 1, key, f"must be >= 1 or null, got {value}")
    for key, value in (("train.ckpt_every", t.ckpt_every), ("train.keep_last", t.keep_last),
                       ("train.eval.every_epochs", e.every_epochs), ("data.num_workers", d.num_workers)):
        need(value >= 0, key, f"must be >= 0, got {value}")
    need(t.alpha_ramp_epochs >= 0, "train.alpha_ramp_epochs", f"must be >= 0, got {t.alpha_ramp_epochs}")
    for key, value in (("lr", o.lr), ("warmup_lr", o.warmup_lr), ("min_lr", o.min_lr), ("eps", o.eps),
                       ("weight_decay", o.weight_decay), ("clip_grad_norm", o.clip_grad_norm), ("temp_lr", o.temp_lr)):
        need(value is None or math.isfinite(value), f"train.optimizer.{key}", f"must be a finite number, got {value}")
    need(o.lr > 0 or math.isnan(o.lr), "train.optimizer.lr", f"must be > 0, got {o.lr}")  # NaN: said above
    need(bool(str(t.output_dir).strip()), "train.output_dir",
         "is empty; give a folder for the run (an empty path would write into the current folder)")
    need(0 <= o.warmup_lr and 0 <= o.min_lr, "train.optimizer.warmup_lr",
         f"warmup_lr and min_lr must be >= 0, got {o.warmup_lr}, {o.min_lr}")
    need(o.weight_decay >= 0, "train.optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "train.optimizer.betas",
         f"must be two numbers in [0, 1), got {o.betas}")
    need(o.warmup_steps >= 0, "train.optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(0 <= o.max_warmup_fraction <= 1, "train.optimizer.max_warmup_fraction",
         f"must be in [0, 1], got {o.max_warmup_fraction}")
    need(o.clip_grad_norm is None or o.clip_grad_norm > 0, "train.optimizer.clip_grad_norm",
         f"must be > 0 or null, got {o.clip_grad_norm}")
    need(o.temp_lr is None or o.temp_lr > 0, "train.optimizer.temp_lr", f"must be > 0 or null, got {o.temp_lr}")
    need(d.crop_scale is None or (len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1),
         "data.crop_scale", f"must be [low, high] with 0 < low <= high <= 1, or null, got {d.crop_scale}")
    need(d.randaugment_ops >= 0, "data.randaugment_ops", f"must be >= 0, got {d.randaugment_ops}")
    need(0 <= d.randaugment_magnitude <= 10, "data.randaugment_magnitude",
         f"must be in [0, 10], got {d.randaugment_magnitude}")
    need(o.temp_lr is None or config.model.learn_temp, "train.optimizer.temp_lr",
         f"is {o.temp_lr} but model.learn_temp is false: a fixed temperature has no learning rate")
    errors += style_variant_errors(d.style_variants, t.task)
    if d.dataset == "albef_json":
        need(bool(d.train_files), "data.train_files", "albef_json needs at least one JSON file")
        need(d.tokenizer is not None, "data.tokenizer", "albef_json needs a tokenizer directory or name")
    errors += eval_split_errors(d, e.splits, "train.eval.splits", evaluated=e.at_end or e.every_epochs > 0)
    if errors:
        raise ConfigError(f"invalid run config ({config.source}):\n  " + "\n  ".join(errors))


def style_variant_errors(names: Sequence[str], task: str) -> list[str]:
    """Return one "data.style_variants: problem" line per unknown or repeated name, or for a fine-tuning run."""
    if names and task != "pretrain":
        return [f"data.style_variants: style variants are for pretraining (train.task: pretrain), not {task}"]
    errors = [f"data.style_variants: unknown style {name!r}; valid: {', '.join(STYLE_VARIANT_NAMES)}"
              for name in names if name not in STYLE_VARIANT_NAMES]
    return errors + [f"data.style_variants: {name!r} is listed twice"
                     for index, name in enumerate(names) if name in names[:index] and name in STYLE_VARIANT_NAMES]


def eval_split_names(data: DataConfig) -> tuple[str, ...]:
    """Return the evaluation splits `data` has: the emoji corpus's files, or ALBEF JSON's val and test."""
    return EMOJI_EVAL_SPLITS if data.dataset == "emoji" else tuple(ALBEF_JSON_EVAL_FILES)


def eval_split_errors(data: DataConfig, splits: Sequence[str], key: str, *, evaluated: bool = True) -> list[str]:
    """Return one "key: problem" line per unusable name in `splits` (unknown, repeated, or its file not set).

    `key` names the setting in the messages (train.eval.splits, --split); an ALBEF JSON split's file
    (data.val_file / data.test_file) is required only when `evaluated`.
    """
    valid = eval_split_names(data)
    if not splits:
        return [f"{key}: name at least one split ({', '.join(valid)}); train.eval.at_end: false turns "
                f"the evaluation off"]
    errors = []
    for index, name in enumerate(splits):
        if name not in valid:
            errors.append(f"{key}: {name!r} is not an evaluation split of {data.dataset} data; valid: "
                          f"{', '.join(valid)}")
        elif name in splits[:index]:
            errors.append(f"{key}: {name!r} is listed twice")
        elif evaluated and data.dataset == "albef_json" and getattr(data, ALBEF_JSON_EVAL_FILES[name]) is None:
            errors.append(f"{key}: {name!r} needs data.{ALBEF_JSON_EVAL_FILES[name]} (its retrieval JSON)")
    return errors


# ---------------------------------------------------------------------- overrides
def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Return {dotted key: value} from `key=value` strings, each value parsed as YAML."""
    parsed = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.batch_size=8)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            parsed[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML{yaml_problem(error)}") from None
    return parsed


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Return a deep copy of `data` with dotted-key overrides set (missing intermediate sections are created).

    Keys are not checked here; the validation that follows rejects unknown ones by name. A renamed key's
    old name (RENAMED_KEYS) sets the new key and drops the old one from `data`.
    """
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    result = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        dotted = RENAMED_KEYS.get(dotted, dotted)  # an old name sets the new key (and replaces the old one)
        parts = dotted.split(".")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
        for old_key in (key for key, renamed in RENAMED_KEYS.items() if renamed == dotted):
            node.pop(old_key.rpartition(".")[2], None)
    return result


