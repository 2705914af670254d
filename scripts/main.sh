#!/usr/bin/env bash
# The main job: set up, train a ResNet-18 on CIFAR-10 (JPEG) from ../shared/data, run EASIER,
# print the per-stage table. Extra arguments go to `depthcut easier` (e.g. --preset paper).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/depthcut easier --model resnet18 --dataset cifar10-jpeg \
  --data-root "${DATA_ROOT:-../shared/data}" --delta 1.0 --out "${OUT:-runs/main}" --overwrite "$@"
