"""What the checkpoint digest costs: a main-command checkpoint write with and without it, side by side.

The digest is the CRC-32 of every record of the checkpoint archive, which torch.save computes as it
writes (`codis_lib.model.weights_file`). "Without" switches torch's CRC off for the write (the only way
to leave it out); "with" is what `codis-pretrain` does. The write is `codis_lib.train.run_dir.save_checkpoint`
of the main command's model (`load_run_config("pretrain_emoji")`, the tiny preset) after one AdamW step,
so the file holds the optimizer state as a real checkpoint does (~34 MB): the state check, the
torch.save, the fsync and the rename. The two kinds alternate round by round, so drift in machine load
hits both alike; the medians, their ratio and the median of the per-round ratios are printed. For
reference, it also times what a sha256 of every tensor (an own digest beside torch's) would add to a write,
and the check on load against torch.load itself.

Where the ratio comes from (`--breakdown`, the same checkpoint): torch.save into memory with and without the
CRC (the CRC's own time, free of disk noise), and the floor of any digest that reads every byte once: Python's
zlib.crc32 (the fastest all-bytes digest in this environment) over the serialized file. Divided by the write
without the digest, that floor says whether < 2 % is reachable at all on this machine.

    python benchmarks/bench_checkpoint_digest.py               # 15 rounds
    python benchmarks/bench_checkpoint_digest.py --repeats 30

Target (issue 25): the digest costs under 2 % of a main-command checkpoint write.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch

import codis_lib.checkpoint as checkpoint_module
from codis_lib.model import build_model
from codis_lib.model.weights_file import verify_digest
from codis_lib.run_config import load_run_config
from codis_lib.train import run_dir
from codis_lib.train.process import RunContext
from codis_lib.train.schedule import build_adamw


@contextlib.contextmanager
def crc_switched(on: bool):
    """Have torch.save write (or leave out) the CRC-32 of every record; codis forces it on, so bypass that too."""
    forced = checkpoint_module._with_checksums
    torch.serialization.set_crc32_options(on)
    checkpoint_module._with_checksums = contextlib.nullcontext
    try:
        yield
    finally:
        checkpoint_module._with_checksums = forced
        torch.serialization.set_crc32_options(True)


def main_command_state():
    """Return (model, optimizer, config) of the main command, after one AdamW step (so Adam's moments exist)."""
    config = load_run_config("pretrain_emoji")
    torch.manual_seed(0)
    model = build_model(config.model, initialise=False)
    optimizer = build_adamw(model, lr=config.train.optimizer.lr, weight_decay=config.train.optimizer.weight_decay)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.randn_like(parameter) * 1e-3
    optimizer.step()
    return model, optimizer, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the CRC in memory and the all-bytes floor (zlib.crc32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, optimizer, config = main_command_state()
    ctx = RunContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_process_group=False)
    folder = Path(tempfile.mkdtemp(prefix="bench-digest-", dir="."))

    def write(step: int) -> float:
        started = time.perf_counter()
        run_dir.save_checkpoint(ctx, folder, model=model, optimizer=optimizer, schedule=None, scaler=None, step=step,
                                epoch=0, step_in_epoch=step, saved_config=config.to_dict(), keep_last=2)
        return time.perf_counter() - started

    times = {"with": [], "without": []}
    step = 0
    try:
        write(0)  # warm-up: page cache, allocator
        for round_ in range(args.repeats):
            order = ("with", "without") if round_ % 2 == 0 else ("without", "with")
            for kind in order:
                step += 1
                with crc_switched(kind == "with"):
                    times[kind].append(write(step))
        write(step + 1)  # with the digest, as codis-pretrain writes it: the file the load timings read
        latest = checkpoint_module.find_latest_checkpoint(folder)
        size = latest.stat().st_size / 2**20
        stored = checkpoint_module.load_checkpoint(latest)
        tensors = list(_tensors(stored))
        started = time.perf_counter()
        digest = hashlib.sha256()
        for tensor in tensors:
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())
        sha_s = time.perf_counter() - started
        verify_s = statistics.median(_timed(lambda: verify_digest(latest)) for _ in range(5))
        load_s = statistics.median(_timed(lambda: torch.load(latest, weights_only=True)) for _ in range(5))
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    with_s, without_s = statistics.median(times["with"]), statistics.median(times["without"])
    print(f"main-command checkpoint write ({size:.1f} MB, {args.repeats} alternating rounds, {args.threads} thread(s)):")
    print(f"  with the digest (CRC-32 of every record):  median {with_s * 1e3:7.1f} ms "
          f"(min {min(times['with']) * 1e3:.1f}, max {max(times['with']) * 1e3:.1f})")
    print(f"  without (torch's CRC switched off):          median {without_s * 1e3:7.1f} ms "
          f"(min {min(times['without']) * 1e3:.1f}, max {max(times['without']) * 1e3:.1f})")
    paired = statistics.median(w / o for w, o in zip(times["with"], times["without"]))
    print(f"  ratio with / without: {with_s / without_s:.3f}  (median of the per-round ratios {paired:.3f}; min over "
          f"min: {min(times['with']) / min(times['without']):.3f}; target < 1.02)")
    print(f"for reference: a sha256 of every tensor would add {sha_s * 1e3:.1f} ms "
          f"({sha_s / without_s * 100:.1f} % of the write)")
    print(f"on load: checking the digest {verify_s * 1e3:.1f} ms, torch.load {load_s * 1e3:.1f} ms")
    if args.breakdown:
        _breakdown(stored, without_s, args.repeats)


def _breakdown(stored: dict, without_s: float, repeats: int) -> None:
    """Print the CRC's own cost (torch.save into memory, on vs off) and the floor of any all-bytes digest."""
    memory = {"with": [], "without": []}
    for round_ in range(repeats):
        for kind in (("with", "without") if round_ % 2 == 0 else ("without", "with")):
            with crc_switched(kind == "with"):
                buffer = io.BytesIO()
                memory[kind].append(_timed(lambda: torch.save(stored, buffer)))
    data = buffer.getvalue()
    crc_s = statistics.median(memory["with"]) - statistics.median(memory["without"])
    floor_s = statistics.median(_timed(lambda: zlib.crc32(data)) for _ in range(repeats))
    print(f"breakdown ({len(data) / 2**20:.1f} MB serialized, {repeats} rounds):")
    print(f"  torch.save into memory: with the CRC {statistics.median(memory['with']) * 1e3:.1f} ms, without "
          f"{statistics.median(memory['without']) * 1e3:.1f} ms: the CRC itself {crc_s * 1e3:.1f} ms "
          f"({crc_s / without_s * 100:.1f} % of the write without it)")
    print(f"  floor of any digest reading every byte once (zlib.crc32, {len(data) / floor_s / 1e9:.1f} GB/s): "
          f"{floor_s * 1e3:.1f} ms = {floor_s / without_s * 100:.1f} % of the write; 2 % of the write is "
          f"{without_s * 20:.1f} ms, i.e. {len(data) / (without_s * 0.02) / 1e9:.1f} GB/s would be needed")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
