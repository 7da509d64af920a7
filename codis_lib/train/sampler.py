"""Data order and per-sample seeds that do not depend on how the global batch is split over processes.

Two things make a run with P processes at batch b compute the same thing as one process at batch P*b:

1. The same samples, in the same order, form each global batch. `GlobalBatchSampler` draws one
   permutation per epoch from (seed, epoch), exactly as torch's DistributedSampler does, cuts it into
   global batches of P*b, and gives rank r the r-th contiguous slice of b samples. Gathering over ranks
   (in rank order) therefore reassembles the global batch in the single-process order, which matters
   wherever the order is visible: the ITM hard-negative draw (a multinomial over the batch's columns)
   and the FIFO queue. torch's DistributedSampler deals indices round-robin (rank r gets r, r+P, ...)
   instead, which reorders the global batch.
2. All per-sample randomness of the model (MLM masking, hard negatives) comes from `sample_seeds`,
   a hash of (seed, epoch, dataset index), not from a per-process generator.

The sampler also skips the batches of an epoch that a resumed run has already trained on.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence, Sized

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

_MASK64 = (1 << 64) - 1


class GlobalBatchSampler(DistributedSampler):
    """Yields this rank's indices: contiguous slices of seeded, per-epoch global batches (last partial one dropped).

    `len(sampler)` is the number of indices this rank yields in the current epoch (after any skipped
    batches); `batches_per_epoch` the number of global batches in a full epoch, a multiple of
    `batches_multiple_of` (gradient accumulation) so every optimizer step sees the same number of samples.
    """

    def __init__(self, dataset: Sized, *, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, batches_multiple_of: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.global_batch = batch_size * num_replicas
        full = len(dataset) // self.global_batch
        self.batches_per_epoch = (full // batches_multiple_of) * batches_multiple_of
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than one optimizer step "
                             f"({self.global_batch} x {batches_multiple_of} samples): lower train.batch_size "
                             f"or train.grad_accum_steps")
        self.start_batch = 0

    def set_start_batch(self, start_batch: int) -> None:
        """Skip the first `start_batch` global batches of the current epoch (a resumed run saw them)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.start_batch = start_batch

    def epoch_order(self) -> torch.Tensor:
        """Return the permutation of dataset indices for the current epoch (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator)

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order().tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            start = batch * self.global_batch + self.rank * self.batch_size
            yield from order[start:start + self.batch_size]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def _splitmix64(value: int) -> int:
    """Return the splitmix64 finaliser of a 64-bit integer (a well-mixed hash)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


MODEL_STREAM = 0  # seeds passed to the model (MLM masking, ITM negatives)
DATA_STREAM = 1  # seeds under which a dataset item is loaded (caption choice, augmentation)


def sample_seed(seed: int, epoch: int, index: int, stream: int = MODEL_STREAM) -> int:
    """Return a non-negative 63-bit seed for dataset sample `index` in `epoch` of a run seeded with `seed`.

    `stream` separates independent uses of one sample (the data pipeline, the model).
    """
    mixed = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    mixed = _splitmix64(mixed ^ stream)
    return mixed >> 1  # fits int64 and is non-negative (torch.Generator.manual_seed accepts it)


def sample_seeds(seed: int, epoch: int, indices: Sequence[int] | torch.Tensor,
                 stream: int = MODEL_STREAM) -> torch.Tensor:
    """Return the (B,) int64 seeds of the dataset samples `indices` (see `sample_seed`)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    return torch.tensor([sample_seed(seed, epoch, int(i), stream) for i in indices], dtype=torch.int64)


class SeededItems(Dataset):
    """Wraps a dataset so that item i of epoch e is produced under torch.manual_seed(seed(run, e, i)).

    The datasets draw their randomness (which caption of a record, crop, flip, RandAugment) from
    torch's global generator. Seeding it per item makes an item depend only on (seed, epoch, index):
    the same whether it is loaded by one process or another, by the main process or a DataLoader
    worker, in an uninterrupted run or after a resume. The caller's generator state is restored after
    each item, so the training loop's own random stream is untouched. A DataLoader fetches whole
    batches through ``__getitems__``, which gives each item its own generator under the same seed
    instead, so the datasets can transform a batch at once with the same result.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the seeds of `epoch` for the items loaded from now on (call before creating the iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list:
        """Return the items of a whole batch (DataLoader calls this), each still decided by (seed, epoch, index) alone.

        A dataset with ``load_items(indices, generators)`` loads the batch at once, item k drawing
        from its own generator seeded as ``__getitem__`` seeds the global one: the same items, bit
        for bit, as loading them one at a time. Any other dataset is loaded item by item.
        """
        load_items = getattr(self.dataset, "load_items", None)
        if load_items is None:
            return [self[index] for index in indices]
        generators = [torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index, DATA_STREAM))
                      for index in indices]
        return load_items(list(indices), generators)

    def __getitem__(self, index: int):
        generator = torch.default_generator  # the CPU generator behind torch.rand & co. without generator=
        caller_state = generator.get_state()
        generator.manual_seed(sample_seed(self.seed, self.epoch, index, DATA_STREAM))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(caller_state)


def steps_per_epoch(dataset_size: int, global_batch: int, grad_accum_steps: int) -> int:
    """Return the optimizer steps in one epoch (partial global batches and accumulation groups are dropped)."""
    return math.floor(dataset_size / global_batch) // grad_accum_steps
