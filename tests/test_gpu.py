"""The GPU tier (`pytest -m gpu`): what only a CUDA device can check. Skipped, and counted as skipped, without one.

- base-size CODIS steps under bf16 autocast: finite, close to fp32, and the loss falls on a repeated batch;
- the fp16 path through the real trainer: GradScaler on, finite losses, the loss scale recorded in the checkpoint;
- NCCL in a one-process group through torchrun (the launch path of notebook 07 and the paper's recipe);
- `train.compile: true` (torch.compile of every transformer block) against eager on the same seed;
- notebook 07's launch path (its requirement check, torchrun command and launcher) with one GPU.
`scripts/gpu_check.sh` runs this tier and benchmarks/bench_gpu.py on a one-GPU machine.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port, tiny_run_overrides

pytestmark = pytest.mark.gpu  # conftest.py skips these without CUDA

REPO = Path(__file__).resolve().parents[1]


def _random_batch(config, batch: int, length: int, device):
    """Return random images and [CLS]-first token ids of the model's sizes (step time and finiteness only)."""
    gen = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    image = torch.randn(batch, 3, size, size, generator=gen)
    ids = torch.randint(10, config.text.vocab_size, (batch, length), generator=gen)
    ids[:, 0] = config.text.cls_token_id
    mask = torch.ones(batch, length, dtype=torch.long)
    return image.to(device), ids.to(device), mask.to(device)


def test_base_size_steps_under_bf16_autocast_are_finite_close_to_fp32_and_learn():
    from codis_lib import ModelConfig, build_model

    device = torch.device("cuda")
    config = ModelConfig.preset("base").with_overrides({"queue_size": 64, "vision.image_size": 128})
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    image, ids, mask = _random_batch(config, 16, 24, device)
    torch.manual_seed(1)
    with torch.no_grad():
        fp32 = model(image, ids, mask, alpha=0.4).loss.item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    losses = []
    for _ in range(4):
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = model(image, ids, mask, alpha=0.4)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(output.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - fp32) / abs(fp32) < 0.05  # bf16 rounding, not a different computation
    assert losses[-1] < losses[0]


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    """Run the trainer on the GPU for 4 steps of the small corpus (subprocess); return its run folder."""
    out = tmp_path / name
    command = [sys.executable, "-m", "codis_lib.train.cli", "pretrain", "--config", "pretrain_emoji"]
    for value in tiny_run_overrides(out, 4, **{"train.device": "cuda"}) + list(extra):
        command += ["--set", value]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def _train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


def test_fp16_through_the_trainer_uses_the_scaler_and_stays_finite(tmp_path):
    run_dir = _run(tmp_path, "fp16", "train.precision=fp16")
    losses = _train_losses(run_dir)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    state = torch.load(run_dir / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    scaler = state.get("scaler") or {}
    assert scaler and math.isfinite(float(scaler.get("scale", float("nan")))), sorted(state)


def test_nccl_in_a_one_process_group_through_torchrun(tmp_path):
    out = tmp_path / "nccl"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
               "--master_port", str(free_port()), "-m", "codis_lib.train.cli", "pretrain", "--config", "pretrain_emoji"]
    for value in tiny_run_overrides(out, 3, **{"train.device": "cuda"}):
        command += ["--set", value]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TORCH_DISTRIBUTED_DEBUG": "OFF"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 process(es)" in result.stdout + result.stderr and "device cuda" in result.stdout + result.stderr
    assert len(_train_losses(out)) == 3


def test_compiled_blocks_match_eager_on_the_same_seed(tmp_path):
    eager = _train_losses(_run(tmp_path, "eager"))
    compiled = _train_losses(_run(tmp_path, "compiled", "train.compile=true"))
    assert len(compiled) == len(eager) == 4
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-2 * abs(a), (eager, compiled)  # same computation, fused kernels round differently


def test_notebook_07_launch_path_with_one_gpu(tmp_path):
    """Notebook 07's own functions: the requirement check with gpus=True, the torchrun command, the launch."""
    from codis_lib.train.launch import launch_requirements, run_command, torchrun_command
    from codis_lib.run_config import load_run_config

    overrides = dict(value.split("=", 1) for value in tiny_run_overrides(tmp_path / "nb07", 3,
                                                                         **{"train.device": "cuda"}))
    run_config = load_run_config("pretrain_emoji", overrides=[f"{k}={v}" for k, v in overrides.items()],
                                 world_size=1)
    assert launch_requirements(run_config, 1, gpus=True) == []
    assert any("CUDA GPUs" in line for line in launch_requirements(run_config, torch.cuda.device_count() + 1))
    result = run_command(torchrun_command("pretrain_emoji", overrides, nproc_per_node=1), tmp_path / "torchrun.log",
                         cwd=REPO, echo=False, timeout_s=600)
    assert result.returncode == 0, result.tail
    assert len(_train_losses(tmp_path / "nb07")) == 3
