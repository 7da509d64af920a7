"""Emoji loader throughput (images/s) on the path training takes, against the alternatives, side by side.

    python benchmarks/bench_loader.py                      # data/emoji, 64 px, 2 workers, 5 repeats
    python benchmarks/bench_loader.py --repeats 3 --batches 20

Training loads its data as ``build_train_data`` builds it: the dataset wrapped in ``SeededItems``
(one seed per (seed, epoch, index)), a ``GlobalBatchSampler``, the real collator (tokenisation
included) and DataLoader workers; ``SeededItems.__getitems__`` loads each batch at once, every item
drawing from its own generator. That path (decoded-image cache on, augmentation on) is the headline.
Side by side, in the same run, with repeats interleaved so that every configuration sees the same
machine noise:

- the same seeded items one at a time (``SeededItems.__getitem__``: per-item transforms, the path
  training took before it loaded batches; the items are bit-identical, tests/test_data_datasets.py);
- the training path without the cache (every image decoded from PNG at every visit).

Prints the median and spread (min-max) of images/s and the ratios of the medians. Because the
machine may be shared, it also prints the CPU time spent per image (main process + workers, from
/proc) and the throughput that cost allows on the worker count's cores when nothing else runs.
A per-stage profile in the main process (decode, crop, RandomAugment, normalise) says where the
time goes. Builds the corpus first if data/emoji is missing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from codis_lib.train.sampler import GlobalBatchSampler, SeededItems

TRAINING = "seeded batches, cache (training)"
ONE_AT_A_TIME = "seeded items one at a time, cache"
NO_CACHE = "seeded batches, no cache"


class OneAtATime(torch.utils.data.Dataset):
    """The seeded items with no ``__getitems__``: the DataLoader fetches them one by one (B = 1 transforms)."""

    def __init__(self, seeded: SeededItems):
        self.seeded = seeded

    def __len__(self) -> int:
        return len(self.seeded)

    def __getitem__(self, index: int):
        return self.seeded[index]


def _cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_loader(dataset, seeded: SeededItems, collate, batch_size: int, workers: int, batches: int,
               epoch: int) -> tuple[float, float]:
    """Return (images/s of wall-clock time, CPU seconds per image over main + workers), worker start-up excluded.

    The loader is built as training builds it: a GlobalBatchSampler over the seeded items, epoch ``epoch``.
    """
    sampler = GlobalBatchSampler(seeded, batch_size=batch_size, shuffle=True, seed=seeded.seed)
    sampler.set_epoch(epoch)
    seeded.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        collate_fn=collate, generator=torch.Generator().manual_seed(seeded.seed),
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    iterator = iter(loader)
    next(iterator)  # start-up: fork the workers and fill their first batch
    pids = [os.getpid()] + [w.pid for w in getattr(iterator, "_workers", [])]
    cpu_before = sum(_cpu_seconds(pid) for pid in pids)
    started = time.perf_counter()
    n_images = 0
    for _, batch in zip(range(batches), iterator):
        n_images += batch["image"].shape[0]
    elapsed = time.perf_counter() - started
    cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu_before  # includes prefetching a few batches ahead
    del iterator
    return n_images / elapsed, cpu / n_images


def profile_stages(dataset, cache_dataset, seed: int, batch_size: int, n: int = 256) -> dict[str, float]:
    """Return CPU microseconds per image of each stage, measured in this process on one thread, batch by batch."""
    from codis_lib.data.datasets import decode_image
    from codis_lib.data.transforms import random_resized_crop_box, resized_crop

    torch.set_num_threads(1)
    transform = dataset.transform
    records = dataset.records[:n]
    seeded = SeededItems(cache_dataset, seed)
    timings = dict.fromkeys(["decode PNG", "cache lookup", "random resized crop (bicubic) + flip",
                             "RandomAugment (2 ops, M=7)", "normalise", "whole seeded batch (cache, augment)",
                             "the same items one at a time"], 0.0)
    clock = time.process_time  # CPU time of this process: less affected by other jobs than wall-clock
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        t = clock()
        [decode_image(r.image) for r in chunk]
        timings["decode PNG"] += clock() - t
        t = clock()
        cached = [cache_dataset.images.load(r.image) for r in chunk]
        timings["cache lookup"] += clock() - t
        t = clock()
        crops = torch.stack([
            resized_crop(img, random_resized_crop_box(img.shape[1], img.shape[2], transform.crop_scale,
                                                      transform.crop_ratio), transform.image_size, as_float=True)
            for img in cached])
        timings["random resized crop (bicubic) + flip"] += clock() - t
        t = clock()
        augmented = transform.randaugment(crops)
        timings["RandomAugment (2 ops, M=7)"] += clock() - t
        t = clock()
        transform.normalize(augmented)
        timings["normalise"] += clock() - t
        indices = list(range(start, start + len(chunk)))
        t = clock()
        seeded.__getitems__(indices)
        timings["whole seeded batch (cache, augment)"] += clock() - t
        t = clock()
        [seeded[i] for i in indices]
        timings["the same items one at a time"] += clock() - t
    return {k: v / len(records) * 1e6 for k, v in timings.items()}


def build_datasets(data_dir: Path, image_size: int, seed: int) -> dict[str, tuple]:
    """Return {configuration: (what the DataLoader reads, the SeededItems behind it)}, cache built once per dataset."""
    from codis_lib.data.datasets import PretrainDataset

    cached, uncached = (PretrainDataset(data_dir / "pretrain.json", image_size=image_size, augment=True,
                                        cache=cache, check_images="exists") for cache in (True, False))
    seeded_cached, seeded_uncached = SeededItems(cached, seed), SeededItems(uncached, seed)
    return {TRAINING: (seeded_cached, seeded_cached), ONE_AT_A_TIME: (OneAtATime(seeded_cached), seeded_cached),
            NO_CACHE: (seeded_uncached, seeded_uncached)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/emoji")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30, help="batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from codis_lib.data.collate import PRETRAIN_MAX_LENGTH, ImageTextCollator
    from codis_lib.data.tokenizer import load_tokenizer

    data_dir = Path(args.data_dir)
    if not (data_dir / "manifest.json").is_file():
        from codis_lib.data.emoji_corpus import build_emoji_corpus

        print(f"building the emoji corpus in {data_dir} first")
        build_emoji_corpus(data_dir, args.image_size)
    collate = ImageTextCollator(load_tokenizer(data_dir / "tokenizer"), max_length=PRETRAIN_MAX_LENGTH)
    started = time.perf_counter()
    configurations = build_datasets(data_dir, args.image_size, args.seed)
    cached = configurations[TRAINING][1].dataset
    print(f"{len(cached)} pretraining records, {len(cached.images.cache)} distinct images; datasets built in "
          f"{time.perf_counter() - started:.1f} s (cache of {cached.images.cache.nbytes / 2**20:.0f} MiB decoded)")
    print(f"loader: batch {args.batch_size}, {args.workers} workers, {args.batches} batches x {args.repeats} repeats, "
          f"{args.image_size} px, augmentation on, torch threads per worker 1\n")

    rates = {key: [] for key in configurations}
    costs = {key: [] for key in configurations}
    load_before = os.getloadavg()[0]
    for repeat in range(args.repeats):
        for key, (dataset, seeded) in configurations.items():  # interleaved: every configuration sees the same noise
            rate, cost = run_loader(dataset, seeded, collate, args.batch_size, args.workers, args.batches, repeat)
            rates[key].append(rate)
            costs[key].append(cost)
    load_after = os.getloadavg()[0]

    cores = min(args.workers, os.cpu_count() or 1) or 1
    print(f"machine load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores "
          f"(other jobs slow the wall-clock numbers most; CPU time suffers less)")
    for key in configurations:
        rate, cost = statistics.median(rates[key]), statistics.median(costs[key])
        print(f"{key:34s} {rate:7.0f} img/s  (min {min(rates[key]):.0f}, max {max(rates[key]):.0f})   "
              f"CPU {cost * 1e6:5.0f} us/img -> {cores / cost:5.0f} img/s on {cores} free cores")
    for other in (ONE_AT_A_TIME, NO_CACHE):
        ratio = statistics.median(rates[TRAINING]) / statistics.median(rates[other])
        cpu_ratio = statistics.median(costs[other]) / statistics.median(costs[TRAINING])
        print(f"ratio training path / {other}: {ratio:.2f}x wall-clock, {cpu_ratio:.2f}x CPU time")

    print(f"\nwhere the time goes (one thread, main process, batches of {args.batch_size}, CPU microseconds per image):")
    stages = profile_stages(configurations[NO_CACHE][1].dataset, cached, args.seed, args.batch_size)
    for stage, micros in stages.items():
        print(f"  {stage:38s} {micros:7.0f}")


if __name__ == "__main__":
    main()
