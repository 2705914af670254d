#!/usr/bin/env bash
# Create .venv and install depthcut with its test tools. Safe to run again (fast when done).
# The constraints file pins the CPU build of torch: an unpinned install would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${pip[@]}" torch==2.13.0 numpy 2> >(grep -v "is ignored: it is neither" >&2)
"${pip[@]}" -e ".[test,plot,onnx]" 2> >(grep -v "is ignored: it is neither" >&2)
