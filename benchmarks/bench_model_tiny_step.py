"""Time one training step (forward + backward + AdamW) of the tiny preset on CPU in each mode.

Usage: python benchmarks/bench_model_tiny_step.py [--batch 64] [--text-length 20] [--steps 10] [--threads 2]
Prints seconds per step and per 100 steps for clip / albef / codis, and each mode's ratio to clip,
all measured side by side in one run (CPU timings drift between runs on shared machines).
"""
from __future__ import annotations

import argparse
import time

import torch

from codis_lib.config import ModelConfig
from codis_lib.model import build_model


def time_mode(mode: str, batch: int, text_length: int, steps: int, overrides: dict) -> float:
    """Return the median seconds of one optimizer step of the tiny model in `mode`."""
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").with_overrides({"mode": mode, **overrides})
    model = build_model(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.02)
    size = config.vision.image_size
    image = torch.randn(batch, 3, size, size)
    input_ids = torch.randint(10, config.text.vocab_size, (batch, text_length))
    input_ids[:, 0] = config.text.cls_token_id
    lengths = torch.randint(text_length // 2, text_length + 1, (batch,))
    attention_mask = (torch.arange(text_length)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask  # pad id 0 after each caption
    durations = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        output = model(image, input_ids, attention_mask, alpha=0.4)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        if step >= 2:
            durations.append(time.perf_counter() - start)
    durations.sort()
    return durations[len(durations) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--text-length", type=int, default=20, help="padded caption length in tokens")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=None, help="override vision.patch_size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {} if args.patch_size is None else {"vision.patch_size": args.patch_size}
    results = {mode: time_mode(mode, args.batch, args.text_length, args.steps, overrides)
               for mode in ("clip", "albef", "codis")}
    print(f"tiny preset, batch {args.batch}, text length {args.text_length}, {args.threads} threads, "
          f"overrides {overrides or 'none'}")
    for mode, seconds in results.items():
        print(f"  {mode:6s} {seconds:.3f} s/step  {100 * seconds:6.1f} s/100 steps  "
              f"ratio to clip {seconds / results['clip']:.2f}")


if __name__ == "__main__":
    main()
