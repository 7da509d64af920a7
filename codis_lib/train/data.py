"""The training data of a run: tokenizer, dataset, the seeded global-batch sampler and the DataLoader.

    data = build_train_data(config, ctx)   # the emoji corpus is built first when missing (rank 0)
    data.set_epoch(epoch, start_batch)     # before iterating data.loader

Data order and per-sample randomness do not depend on the number of processes (see
`codis_lib.train.sampler`). What every batch needs before the forward is `codis_lib.train.batches`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from codis_lib.data.tokenizer import tokenizer_location
from codis_lib.run_config import RunConfig
from codis_lib.train.batches import teacher_view_inputs
from codis_lib.train.process import RunContext
from codis_lib.train.sampler import GlobalBatchSampler, SeededItems
from codis_lib.typed_config import ConfigError

__all__ = ["TrainData", "ensure_emoji_corpus", "build_train_data", "augmentation_options"]


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
    """Return the emoji corpus directory, building it on rank 0 first when it is missing and allowed.

    It is built only into a new or empty folder, or one the builder made; a folder of the user's own
    files (no manifest.json of the builder's) is refused in one line, and nothing is added to one.
    """
    from codis_lib.data.emoji_manifest import check_corpus_folder, corpus_folder_is_ours

    data = config.data
    root = Path(data.root)
    if not (root / "manifest.json").is_file():
        if not data.build_if_missing:
            raise FileNotFoundError(f"no emoji corpus in {root} (data.root) and data.build_if_missing is false; "
                                    f"build it with `codis-build-emoji --out-dir {root}`")
        check_corpus_folder(root, "data.root")  # on every rank: a folder of the user's files is refused by all
        if ctx.is_main:
            from codis_lib.data.emoji_corpus import build_emoji_corpus

            print(f"[codis] building the emoji corpus in {root} (once; about a minute on 2 cores) ...", flush=True)
            manifest = build_emoji_corpus(root, image_size=data.emoji_image_size, limit=data.emoji_limit)
            counts = manifest["counts"]
            print(f"[codis] emoji corpus: {counts['emoji']} emoji, {counts['images']} images", flush=True)
    elif ctx.is_main and not (root / "new_style_manifest.json").is_file() and corpus_folder_is_ours(root):
        from codis_lib.data.emoji_new_style import ensure_new_style

        ensure_new_style(root)  # a corpus built before the held-out style existed, or before the font was installed
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
    dataset = dataset_class(files, image_root, image_size=config.model.vision.image_size, augment=data.augment,
                            augmentation=augmentation_options(data),
                            cache=data.cache_images, check_images="exists" if data.cache_images else "verify",
                            on_error=data.on_error,
                            teacher_image=own_image, teacher_caption=other_caption,
                            teacher_other_drawing=own_image and config.model.teacher_view == "other_drawing",
                            style_variants=data.style_variants)
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


def augmentation_options(data) -> dict[str, Any]:
    """Return the data section's augmentation keys as the dataset's ``augmentation`` argument."""
    return {"crop_scale": tuple(data.crop_scale) if data.crop_scale is not None else None,
            "randaugment_ops": data.randaugment_ops, "randaugment_magnitude": data.randaugment_magnitude}
