"""Base-size CODIS pretraining steps on a GPU: pairs per second and model FLOP utilisation (MFU).

Measures forward + backward + AdamW of the full CODIS model (student, EMA teacher, queues, codebook,
ITM with hard negatives, MLM) in bf16 autocast, with and without `torch.compile`, side by side in
one run. Inputs are random tensors of the right shapes: step time does not depend on pixel values
or token ids. FLOPs are counted once per configuration with torch.utils.flop_counter (matmuls,
convolutions and attention; element-wise work is not counted, as is usual for MFU).

    python benchmarks/bench_gpu.py                       # base, batch 64, 256 px, compile off and on
    python benchmarks/bench_gpu.py --compile off --steps 10
    python benchmarks/bench_gpu.py --device cpu --preset tiny --batch 8 --steps 2   # smoke test on CPU

Designed to finish in under 5 minutes on one H100/H200 (compilation included).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from codis_lib.config import ModelConfig
from codis_lib.model import build_model


def make_batch(config: ModelConfig, batch: int, text_length: int, device: torch.device):
    """Random images and padded [CLS]-first token ids of the model's sizes."""
    gen = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    image = torch.randn(batch, 3, size, size, generator=gen)
    input_ids = torch.randint(10, config.text.vocab_size, (batch, text_length), generator=gen)
    input_ids[:, 0] = config.text.cls_token_id
    lengths = torch.randint(text_length // 2, text_length + 1, (batch,), generator=gen)
    attention_mask = (torch.arange(text_length)[None, :] < lengths[:, None]).long()
    return image.to(device), (input_ids * attention_mask).to(device), attention_mask.to(device)


def run(config: ModelConfig, args, compiled: bool, device: torch.device) -> dict:
    """Return seconds per step (median, spread), pairs/s, FLOPs per step and MFU for one configuration."""
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.02,
                                  fused=device.type == "cuda")
    image, input_ids, attention_mask = make_batch(config, args.batch, args.text_length, device)
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            output = forward(image, input_ids, attention_mask, alpha=0.4)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    durations = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        durations.append(time.perf_counter() - start)
    flop_counter = FlopCounterMode(display=False)
    with flop_counter:
        step()  # eager or compiled, the counted FLOPs are the model's
    sync()
    seconds = statistics.median(durations)
    flops = flop_counter.get_total_flops()
    result = {"compile": compiled, "s_per_step": seconds, "spread_s": (max(durations) - min(durations)) / 2,
              "pairs_per_s": args.batch / seconds, "tflops_per_step": flops / 1e12, "warmup_s": warmup_s,
              "achieved_tflops": flops / seconds / 1e12}
    result["mfu"] = result["achieved_tflops"] / args.peak_tflops
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", help="model preset (base = ViT-B/16 + BERT-base 6+6)")
    parser.add_argument("--batch", type=int, default=64, help="pairs per step (ALBEF: 64 per GPU)")
    parser.add_argument("--text-length", type=int, default=25, help="tokens per caption (ALBEF pretraining: 25)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the GPU for MFU (H100/H200 SXM: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device is visible; run it on a GPU machine, "
                         "or pass --device cpu --preset tiny for a smoke test")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = ModelConfig.preset(args.preset)
    config.validate_for_batch(args.batch)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: preset {args.preset}, batch {args.batch}, {config.vision.image_size} px, "
          f"{args.text_length} tokens, {args.precision}, {args.steps} timed steps")
    results = [run(config, args, compiled, device) for compiled in modes]
    print(f"{'compile':<8} {'s/step':>8} {'+-':>6} {'pairs/s':>9} {'TFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6}"
          f" {'warm-up s':>9} {'peak GiB':>8}")
    for r in results:
        print(f"{str(r['compile']):<8} {r['s_per_step']:8.4f} {r['spread_s']:6.4f} {r['pairs_per_s']:9.1f} "
              f"{r['tflops_per_step']:11.3f} {r['achieved_tflops']:8.1f} {100 * r['mfu']:5.1f}% "
              f"{r['warmup_s']:9.1f} {r.get('peak_memory_gib', float('nan')):8.1f}")
    if len(results) == 2:
        print(f"torch.compile speed-up: {results[0]['s_per_step'] / results[1]['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
