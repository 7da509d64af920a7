#!/usr/bin/env bash
# The GPU checks on a one-GPU machine, in one go (about 5-8 minutes on an H100/H200):
#   1. the GPU test tier: pytest -m gpu (bf16 base steps, the fp16 scaler, NCCL through torchrun,
#      torch.compile against eager, notebook 07's launch path);
#   2. benchmarks/bench_gpu.py: base-size pretraining steps, pairs/s and MFU, compile off and on.
# Usage, from the repository root after README command 1's install:  bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
out="${1:-gpu_check}"
mkdir -p "$out"
python="${PYTHON:-.venv/bin/python}"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')"
"$python" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$out/device.txt"
status=0
timeout 420 "$python" -m pytest -m gpu -v -p no:cacheprovider --junitxml="$out/gpu_tests.xml" tests/ 2>&1 \
    | tee "$out/gpu_tests.log" || status=$?
timeout 300 "$python" benchmarks/bench_gpu.py 2>&1 | tee "$out/bench_gpu.log" || status=$?
echo "gpu_check: tests and benchmark logs in $out/ (exit $status)"
exit $status
