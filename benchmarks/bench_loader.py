"""Emoji loader throughput (images/s) with and without the decoded-image cache, measured side by side.

    python benchmarks/bench_loader.py                      # data/emoji, 64 px, 2 workers, 5 repeats
    python benchmarks/bench_loader.py --repeats 3 --batches 20

For each configuration (cache on/off x augmentation on/off, plus cache + augmentation one item
at a time, which is how a per-item seeding wrapper loads) a DataLoader with 2 worker
processes and the real collator (tokenisation included) is run for a fixed number of batches;
repeats are interleaved so that the configurations see the same machine noise. Prints the
median and the spread (min-max) of images/s, and the cache/no-cache ratio. Because the
machine may be shared, it also prints the CPU time spent per image (main process + workers,
from /proc) and the throughput that cost allows on the worker count's cores when nothing
else runs. A per-stage profile in the main process (decode, crop, RandomAugment, normalise)
says where the time goes. Builds the corpus first if data/emoji is missing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader


class ItemByItem(torch.utils.data.Dataset):
    """The dataset seen one item at a time (no ``__getitems__``), as a per-item seeding wrapper sees it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]


def _cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_loader(dataset, collate, batch_size: int, workers: int, batches: int, seed: int) -> tuple[float, float]:
    """Return (images/s of wall-clock time, CPU seconds per image over main + workers), worker start-up excluded."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                        drop_last=True, generator=generator, persistent_workers=False,
                        prefetch_factor=4 if workers else None)
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


def profile_stages(dataset, cache_dataset, batch_size: int, n: int = 256) -> dict[str, float]:
    """Return CPU microseconds per image of each stage, measured in this process on one thread, batch by batch."""
    from codis_lib.data.datasets import decode_image
    from codis_lib.data.transforms import random_resized_crop_box, resized_crop

    torch.set_num_threads(1)
    transform = dataset.transform
    records = dataset.records[:n]
    timings = dict.fromkeys(["decode PNG", "cache lookup", "random resized crop (bicubic) + flip",
                             "RandomAugment (2 ops, M=7)", "normalise", "whole __getitems__ (cache, augment)"], 0.0)
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
        t = clock()
        cache_dataset.__getitems__(list(range(start, start + len(chunk))))
        timings["whole __getitems__ (cache, augment)"] += clock() - t
    return {k: v / len(records) * 1e6 for k, v in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/emoji")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30, help="batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from codis_lib.data.collate import PRETRAIN_MAX_LENGTH, ImageTextCollator
    from codis_lib.data.datasets import PretrainDataset
    from codis_lib.data.tokenizer import load_tokenizer

    data_dir = Path(args.data_dir)
    if not (data_dir / "manifest.json").is_file():
        from codis_lib.data.emoji_corpus import build_emoji_corpus

        print(f"building the emoji corpus in {data_dir} first")
        build_emoji_corpus(data_dir, args.image_size)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    collate = ImageTextCollator(tokenizer, max_length=PRETRAIN_MAX_LENGTH)
    started = time.perf_counter()
    datasets = {}
    for cache in (True, False):
        for augment in (True, False):
            datasets[(cache, augment)] = PretrainDataset(
                data_dir / "pretrain.json", image_size=args.image_size, augment=augment, cache=cache,
                check_images="exists")
    datasets[("item by item", True)] = ItemByItem(datasets[(True, True)])  # cache, augment, no batching
    cache_seconds = time.perf_counter() - started
    n_images = len(datasets[(True, True)].images.cache)
    print(f"{len(datasets[(True, True)])} pretraining records, {n_images} distinct images; "
          f"datasets built in {cache_seconds:.1f} s (two caches of "
          f"{datasets[(True, True)].images.cache.nbytes / 2**20:.0f} MiB decoded)")
    print(f"loader: batch {args.batch_size}, {args.workers} workers, {args.batches} batches x {args.repeats} repeats, "
          f"{args.image_size} px, torch threads per worker 1\n")

    rates = {key: [] for key in datasets}
    costs = {key: [] for key in datasets}
    load_before = os.getloadavg()[0]
    for repeat in range(args.repeats):
        for key, dataset in datasets.items():  # interleaved: every configuration sees the same noise
            rate, cost = run_loader(dataset, collate, args.batch_size, args.workers, args.batches, seed=repeat)
            rates[key].append(rate)
            costs[key].append(cost)
    load_after = os.getloadavg()[0]

    def describe(values):
        return f"{statistics.median(values):7.0f} img/s  (min {min(values):.0f}, max {max(values):.0f})"

    cores = min(args.workers, os.cpu_count() or 1) or 1
    print(f"machine load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores "
          f"(other jobs slow the wall-clock numbers most; CPU time suffers less)")
    for augment in (True, False):
        label = "augment on " if augment else "augment off"
        for cache in (True, False):
            capacity = cores / statistics.median(costs[(cache, augment)])
            print(f"{label}: {'cache   ' if cache else 'no cache'} {describe(rates[(cache, augment)])}   "
                  f"CPU {statistics.median(costs[(cache, augment)]) * 1e6:5.0f} us/img -> "
                  f"{capacity:5.0f} img/s on {cores} free cores")
        ratio = statistics.median(rates[(True, augment)]) / statistics.median(rates[(False, augment)])
        cpu_ratio = statistics.median(costs[(False, augment)]) / statistics.median(costs[(True, augment)])
        print(f"{label}: ratio cache / no cache = {ratio:.2f}x wall-clock, {cpu_ratio:.2f}x CPU time\n")
    key = ("item by item", True)
    print(f"augment on : cache, one item at a time (no __getitems__) {describe(rates[key])}   "
          f"CPU {statistics.median(costs[key]) * 1e6:5.0f} us/img -> {cores / statistics.median(costs[key]):5.0f} "
          f"img/s on {cores} free cores\n")

    print(f"where the time goes (one thread, main process, batches of {args.batch_size}, CPU microseconds per image):")
    for stage, micros in profile_stages(datasets[(False, True)], datasets[(True, True)], args.batch_size).items():
        print(f"  {stage:38s} {micros:7.0f}")


if __name__ == "__main__":
    main()
