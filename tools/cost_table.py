"""What one training step of each packaged config costs: parameters, FLOPs, peak memory, time; GPU estimates.

For every run config in codis_lib/configs that builds a model (the tiny emoji ones and the base-size
paper recipe), a real model is built from the config (pretrained encoders replaced by random weights of
the same shapes: the cost is the same, nothing downloads) and fed a random batch of the config's shapes
(image size, data.max_tokens as the padded caption length; caption lengths drawn between half and all of
it; image ids for fine-tuning; the teacher's own caption where model.teacher_text_view asks for one).
Each config runs in a fresh process, so one config's memory does not count for the next:

- parameters: trainable (the student, the codebook, the temperature) and total (with the momentum
  teacher, which is frozen); the queues are buffers, listed apart;
- FLOPs per image-text pair: `torch.utils.flop_counter.FlopCounterMode` over one training forward
  (student, teacher, ITM with its hard negatives, MLM where on, the codebook and Sinkhorn), and over the
  forward plus backward; divided by the batch. It counts matrix products, convolutions and attention
  (what dominates), not element-wise work;
- peak memory (CPU): the process's peak resident set (Linux VmHWM, the resource max-RSS figure) over the
  timed steps, and the part of it above what was resident before them (model, AdamW state, batch:
  VmHWM reset through /proc/self/clear_refs), i.e. the activations and gradients of one step;
- time per step: forward + backward + AdamW, median of --steps steps after one warm-up step, on this CPU
  with --threads threads (1 by default);
- GPU: estimates only, until measured (benchmarks/bench_gpu.py measures on a GPU): the forward + backward
  FLOPs at an assumed sustained throughput, --gpu-peak-tflops x --gpu-mfu (by default an H100's 989 dense
  bf16 TFLOP/s at 35 %), for the config's per-GPU batch.

    python tools/cost_table.py                          # every config, the markdown table
    python tools/cost_table.py --configs pretrain_emoji --steps 10 --json costs.json
    python tools/cost_table.py --from-json costs.json   # the table again, measuring nothing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("pretrain_emoji", "finetune_emoji", "pretrain_4m", "finetune_coco", "finetune_flickr")
BASE_BATCH = 2  # base-size configs on this CPU: a few seconds a step at batch 2
EMOJI_TOKENIZER = ROOT / "data" / "emoji" / "tokenizer"  # the corpus's tokenizer sets the tiny models' vocabulary


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    """Return {"trainable", "total", "buffers"}: parameter elements that train, all of them, buffer elements.

    Tensors shared between submodules (tied weights) count once, as `module.parameters()` yields them once.
    """
    parameters = list(module.parameters())
    return {"trainable": sum(p.numel() for p in parameters if p.requires_grad),
            "total": sum(p.numel() for p in parameters),
            "buffers": sum(b.numel() for b in module.buffers())}


def count_flops(function: Callable[[], object]) -> int:
    """Return the FLOPs (2 per multiply-add) FlopCounterMode counts while `function()` runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return int(counter.get_total_flops())


def _peak_rss_mib() -> float:
    """Return this process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _text(config, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return padded [CLS]-first random token ids (B, L) and their mask, lengths between L/2 and L."""
    ids = torch.randint(10, config.text.vocab_size, (batch, length), generator=generator)
    ids[:, 0] = config.text.cls_token_id
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def model_config_of(name: str):
    """Return the run config `name` and its model config as training builds it (random init, tokenizer sizes)."""
    from codis_lib.run_config import load_run_config

    run_config = load_run_config(name)
    model_config = run_config.model.with_overrides({"vision.pretrained": None, "text.pretrained": None})
    if run_config.data.dataset == "emoji" and EMOJI_TOKENIZER.is_dir():
        from codis_lib.data.tokenizer import load_tokenizer

        model_config = model_config.with_tokenizer(load_tokenizer(EMOJI_TOKENIZER))
    return run_config, model_config


def measure(name: str, batch: int, steps: int, threads: int) -> dict:
    """Return the cost figures of config `name` at `batch` pairs per step (run in a fresh process)."""
    from codis_lib.model import build_model

    torch.set_num_threads(threads)
    run_config, config = model_config_of(name)
    torch.manual_seed(0)
    model = build_model(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.02)
    generator = torch.Generator().manual_seed(0)
    size, length = config.vision.image_size, run_config.data.max_tokens
    image = torch.randn(batch, 3, size, size, generator=generator)
    input_ids, attention_mask = _text(config, batch, length, generator)
    extra = {}
    if run_config.train.task == "finetune":
        extra["image_ids"] = torch.arange(batch)
    if config.teacher_text_view == "other_caption":
        extra["teacher_input_ids"], extra["teacher_attention_mask"] = _text(config, batch, length, generator)
    if config.teacher_view == "own":
        extra["image_teacher"] = torch.randn(batch, 3, size, size, generator=generator)

    def forward():
        return model(image, input_ids, attention_mask, alpha=0.4, **extra)

    def step():
        loss = forward().loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: AdamW's state exists from here on
    forward_flops = count_flops(forward)
    optimizer.zero_grad(set_to_none=True)
    step_flops = count_flops(lambda: forward().loss.backward())
    optimizer.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak mark drops to the current resident set
    resident = _peak_rss_mib()
    times, cpu_times = [], []
    for _ in range(steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - started_cpu)
    peak = _peak_rss_mib()
    return {"config": name, "size": "tiny" if config.vision.width < 768 else "base", "batch": batch,
            "per_gpu_batch": run_config.train.batch_size, "image_size": size, "text_length": length,
            "mode": config.mode, "task": run_config.train.task, **count_parameters(model),
            "forward_flops_per_pair": forward_flops / batch, "step_flops_per_pair": step_flops / batch,
            "peak_rss_mib": peak, "step_rss_mib": max(0.0, peak - resident), "step_s": statistics.median(times),
            "step_s_all": times, "step_cpu_s": statistics.median(cpu_times), "threads": threads,
            "load_average": os.getloadavg()[0]}


def _in_fresh_process(name: str, batch: int, steps: int, threads: int) -> dict:
    """Return `measure(...)` run in a new interpreter, so that earlier configs' memory does not count."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import cost_table; "
            f"print(json.dumps(cost_table.measure({name!r}, {batch}, {steps}, {threads})))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{name}: the measurement failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _millions(count: float) -> str:
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count / 1e3:.0f} k"


def _flops(count: float) -> str:
    return f"{count / 1e12:.2f} T" if count >= 1e12 else f"{count / 1e9:.2f} G"


def markdown(results: list[dict], sustained_tflops: float, assumption: str) -> str:
    """Return the cost table (one row per config) and the notes that say how each column was measured."""
    lines = ["| config | model | batch (timed) | trainable params | total params (with teacher) | buffers (queues) "
             "| FLOPs / pair, forward | FLOPs / pair, fwd + bwd | peak RSS (CPU) | of it, the step | s / step (CPU, wall) "
             "| CPU s / step | GPU s / step at the config's batch (estimate) | GPU pairs / s (estimate) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        gpu_pair_s = sustained_tflops * 1e12 / r["step_flops_per_pair"]
        gpu_step_s = r["per_gpu_batch"] / gpu_pair_s
        gpu = (f"{gpu_step_s * 1e3:.0f} ms (batch {r['per_gpu_batch']}) | {gpu_pair_s:,.0f}" if r["size"] == "base"
               else "n/a: launch-bound | n/a")  # a tiny step is far below what FLOPs bound on a GPU
        lines.append(f"| `{r['config']}` | {r['size']}, {r['image_size']} px, {r['text_length']} tokens | {r['batch']} "
                     f"| {_millions(r['trainable'])} | {_millions(r['total'])} | {_millions(r['buffers'])} "
                     f"| {_flops(r['forward_flops_per_pair'])} | {_flops(r['step_flops_per_pair'])} "
                     f"| {r['peak_rss_mib'] / 1024:.2f} GiB | {r['step_rss_mib']:.0f} MiB | {r['step_s']:.2f} "
                     f"| {r['step_cpu_s']:.2f} | {gpu} |")
    steps = " / ".join(sorted({f"{len(r['step_s_all'])} ({r['size']})" for r in results}, reverse=True))
    threads = sorted({r["threads"] for r in results})
    loads = [r["load_average"] for r in results]
    notes = [
        "",
        f"CPU columns measured on this machine, {'/'.join(map(str, threads))} thread(s), fresh process per config; "
        f"s / step = forward + backward + AdamW, median of {steps} steps after one warm-up, at "
        "the batch in the third column (the config's own per-GPU batch for the tiny configs), as wall time and as "
        "the process's CPU time (which other jobs on a shared machine inflate less; 1-minute load average "
        f"{min(loads):.1f}-{max(loads):.1f} during the runs). Peak RSS: the "
        "process's VmHWM over the timed steps (model, AdamW state and the Python/torch runtime included); "
        "\"of it, the step\": above what was resident before them (activations and gradients). FLOPs: "
        "torch.utils.flop_counter.FlopCounterMode (matrix products, convolutions, attention; 2 per multiply-add) "
        "over one training forward (student, frozen teacher, ITM with hard negatives, MLM where on, codebook and "
        "Sinkhorn), divided by the batch. GPU columns are **estimates**, not measurements: fwd + bwd FLOPs at "
        f"{assumption}; element-wise work, the EMA update, the optimizer and data loading are not in them, and a "
        "tiny step is bound by kernel launches, not FLOPs (no estimate).",
    ]
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per tiny config (after one warm-up)")
    parser.add_argument("--base-steps", type=int, default=2, help="timed steps per base-size config")
    parser.add_argument("--base-batch", type=int, default=BASE_BATCH, help="pairs per step for base-size configs")
    parser.add_argument("--tiny-batch", type=int, default=None,
                        help="pairs per step for tiny configs (default: the config's train.batch_size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--gpu-mfu", type=float, default=0.35, help="assumed fraction of the peak sustained")
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    parser.add_argument("--from-json", default=None, help="print the table of an earlier --json file, measuring nothing")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else []
    for name in [] if args.from_json else args.configs:
        _, config = model_config_of(name)
        from codis_lib.run_config import load_run_config

        tiny = config.vision.width < 768
        batch = (args.tiny_batch or load_run_config(name).train.batch_size) if tiny else args.base_batch
        started = time.perf_counter()
        results.append(_in_fresh_process(name, batch, args.steps if tiny else args.base_steps, args.threads))
        print(f"{name}: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    sustained = args.gpu_peak_tflops * args.gpu_mfu
    assumption = (f"an assumed sustained {sustained:.0f} TFLOP/s ({args.gpu_mfu:.0%} of {args.gpu_peak_tflops:.0f} "
                  "dense bf16 TFLOP/s, an H100's peak by default)")
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(markdown(results, sustained, assumption))


if __name__ == "__main__":
    main()
