#!/usr/bin/env bash
# Latency backends on a CUDA GPU: the BN-folded dense model against every site linear, folded,
# for MobileNetV2 x0.5 and x1, Swin-T x0.25 and ResNet-18 x0.25 at 32x32, in PyTorch eager,
# torch.compile (inductor) and eager timed by CUDA events, batch 1 and 128
# (benchmarks/latency_backends.py through scripts/gpu_latency.py). Needs python3 with torch
# (CUDA) only: no onnxruntime, nothing to install. Finishes in under 5 minutes (preparing stops
# at 138 s, timing at 230 s; killed at 290 s). The markdown goes to stdout and to
# ${OUT:-.}/gpu_latency.md.
#
#   bash scripts/gpu_latency.sh                   # from the repository root
#   PYTHON=.venv/bin/python bash scripts/gpu_latency.sh --device cpu --models resnet18:0.25
#                                                 # a dry run without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
target="${OUT:-.}/gpu_latency.md"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout 290 "$python" scripts/gpu_latency.py "$@" | tee "$target"
