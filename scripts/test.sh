#!/usr/bin/env bash
# The tests: set up, say which CPU runs them, lint, run the whole suite. Extra arguments go to
# pytest. Native kernels differ by instruction set, so a failure is traced to its machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
.venv/bin/python -c "import os, torch; print(f'CPU: ${cpu:-unknown}, {os.cpu_count()} cores; torch {torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads')"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
