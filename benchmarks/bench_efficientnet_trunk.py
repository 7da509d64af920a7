"""The frozen ImageNet trunk's forward, default (NCHW) vs channels-last memory layout, side by side.

The main command computes the trunk once per image (training images in the first epoch, each evaluation split
once); at 128 px that is most of its first epoch. Both layouts run on the same batch, alternating, and the
ratio of their times is printed with the largest difference between their outputs.

    python benchmarks/bench_efficientnet_trunk.py --repeats 5 --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch

from codis_lib.config import VisionConfig
from codis_lib.model.efficientnet import EfficientNetTokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backbone-size", type=int, default=128)
    parser.add_argument("--trunk-stages", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = VisionConfig(image_size=64, width=128, backbone="efficientnet_lite0", backbone_size=args.backbone_size,
                          trunk_stages=args.trunk_stages, freeze_blocks=args.trunk_stages)
    encoder = EfficientNetTokens(config).eval()  # channels-last, as the model uses it
    default = EfficientNetTokens(config).eval()
    default.load_state_dict(encoder.state_dict())
    for module in (default.conv_stem, default.bn1, default.blocks):
        module.to(memory_format=torch.contiguous_format)
    images = torch.randn(args.batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def nchw(x):  # the same arithmetic as EfficientNetTokens.trunk, without the layout change
        x = x * default.in_scale + default.in_shift
        x = torch.nn.functional.interpolate(x, size=(args.backbone_size,) * 2, mode="bilinear", align_corners=False,
                                            antialias=True)
        return default.blocks(default.bn1(default.conv_stem(x)))

    times = {"nchw": [], "channels_last": []}
    with torch.no_grad():
        difference = float((nchw(images) - encoder.trunk(images)).abs().max())
        for _ in range(args.repeats):
            for name, run in (("nchw", nchw), ("channels_last", encoder.trunk)):
                started = time.perf_counter()
                run(images)
                times[name].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in times.items()}
    print(f"trunk forward, batch {args.batch} at {args.backbone_size} px, {args.trunk_stages} stages, "
          f"{args.threads} thread(s), {args.repeats} alternating rounds (min):")
    print(f"  NCHW {best['nchw'] * 1000:.0f} ms, channels-last {best['channels_last'] * 1000:.0f} ms: "
          f"{best['nchw'] / best['channels_last']:.2f}x; largest output difference {difference:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
