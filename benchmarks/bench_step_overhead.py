"""What the codebook costs: CODIS against ALBEF training steps on the same model, batch and machine.

For each size, builds the model twice from the same seed, once in `albef` mode (ITC with momentum
distillation + ITM + MLM) and once in `codis` mode (adds the unimodal alignment pair, the codebook,
Sinkhorn, L_code and L_ot), and times forward + backward + AdamW steps, alternating the two modes
step by step so that drift in machine load hits both alike. Prints the median and spread of each and
the ratio. With --memory, also runs each configuration in a fresh process and reports its peak
resident memory (CPU) or peak allocated memory (CUDA).

    python benchmarks/bench_step_overhead.py                       # tiny (batch 64) and base (batch 4)
    python benchmarks/bench_step_overhead.py --sizes tiny --repeats 20 --memory

Targets (issue 7): CODIS at most 10 % over ALBEF at tiny size, 5 % at base size.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench_gpu import make_batch  # same random batch builder as the GPU benchmark (this folder)
from codis_lib.config import ModelConfig
from codis_lib.model import build_model

DEFAULT_BATCH = {"tiny": 64, "base": 4}


def make_trainer(size: str, mode: str, device: torch.device):
    """Return a function that runs one optimizer step of `size` in `mode`."""
    torch.manual_seed(0)
    config = ModelConfig.preset(size).with_overrides({"mode": mode})
    model = build_model(config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.02)
    return config, model, optimizer


def step_fn(model, optimizer, batch):
    image, input_ids, attention_mask = batch

    def step():
        output = model(image, input_ids, attention_mask, alpha=0.4)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
    return step


def time_pair(size: str, batch_size: int, repeats: int, warmup: int, text_length: int, device: torch.device) -> dict:
    """Return per-mode step times (alternating albef and codis steps) and their ratio."""
    steps = {}
    for mode in ("albef", "codis"):
        config, model, optimizer = make_trainer(size, mode, device)
        batch = make_batch(config, batch_size, text_length, device)
        steps[mode] = step_fn(model, optimizer, batch)
    times = {"albef": [], "codis": []}
    for index in range(warmup + repeats):
        for mode in (("albef", "codis") if index % 2 == 0 else ("codis", "albef")):
            start = time.perf_counter()
            steps[mode]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index >= warmup:
                times[mode].append(time.perf_counter() - start)
    result = {mode: {"median_s": statistics.median(t), "spread_s": (max(t) - min(t)) / 2} for mode, t in times.items()}
    # Ratio of medians, and the median of per-round ratios (each round ran both modes back to back).
    result["ratio"] = result["codis"]["median_s"] / result["albef"]["median_s"]
    result["paired_ratio"] = statistics.median(c / a for a, c in zip(times["albef"], times["codis"]))
    return result


def _peak_rss_mib() -> float:
    """Return this process's peak resident memory (VmHWM) in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_peak_in_this_process(size: str, mode: str, batch_size: int, text_length: int, device: str) -> dict:
    """Return peak memory (MiB) of 3 training steps: the whole process and the steps alone."""
    device = torch.device(device)
    config, model, optimizer = make_trainer(size, mode, device)
    step = step_fn(model, optimizer, make_batch(config, batch_size, text_length, device))
    step()  # optimizer state and autograd buffers exist from here on
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _peak_rss_mib()
        with open("/proc/self/clear_refs", "w") as handle:  # Linux: reset the peak-RSS mark to current RSS
            handle.write("5")
    for _ in range(3):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"process_peak_mib": peak, "step_peak_over_resident_mib": peak - before}
    peak = _peak_rss_mib()
    resident = before
    return {"process_peak_mib": peak, "step_peak_over_resident_mib": max(0.0, peak - resident)}


def peak_memory(size: str, mode: str, batch_size: int, text_length: int, device: str) -> dict:
    """Run `measure_peak_in_this_process` in a fresh interpreter so earlier work does not count."""
    code = ("import json, sys; sys.path.insert(0, 'benchmarks');"
            "from bench_step_overhead import measure_peak_in_this_process as m;"
            f"print(json.dumps(m('{size}', '{mode}', {batch_size}, {text_length}, '{device}')))")
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: 64 tiny, 4 base)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--text-length", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per configuration")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {}
    for size in args.sizes:
        batch_size = args.batch or DEFAULT_BATCH[size]
        repeats = args.repeats if size == "tiny" else max(3, args.repeats // 3)
        result = time_pair(size, batch_size, repeats, args.warmup, args.text_length, device)
        target = 1.10 if size == "tiny" else 1.05
        print(f"{size} (batch {batch_size}, {repeats} alternating rounds, {args.threads} threads, {device}):")
        for mode in ("albef", "codis"):
            print(f"  {mode:6s} {result[mode]['median_s'] * 1e3:9.1f} ms/step  +- {result[mode]['spread_s'] * 1e3:.1f}")
        print(f"  codis / albef: {result['ratio']:.3f} (median of paired rounds {result['paired_ratio']:.3f}); "
              f"target <= {target:.2f}")
        if args.memory:
            for mode in ("albef", "codis"):
                result[mode]["memory"] = peak_memory(size, mode, batch_size, args.text_length, args.device)
                memory = result[mode]["memory"]
                print(f"  peak memory {mode}: {memory['process_peak_mib']:.0f} MiB for the process, "
                      f"{memory['step_peak_over_resident_mib']:.0f} MiB of it above the resident model + optimizer")
        report[size] = result
    print(json.dumps(report))


if __name__ == "__main__":
    main()
