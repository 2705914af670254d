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
# editable_mode=compat puts the repository root on sys.path (a .pth file), so `import depthcut`
# finds the package in the ordinary path scan. The default (strict) mode imports through a finder
# that runs after that scan: a script run from the folder that holds this clone (named depthcut,
# no __init__.py) then imports the clone folder as an empty namespace package instead.
"${pip[@]}" -e ".[test,plot,onnx]" --config-settings editable_mode=compat \
  2> >(grep -v "is ignored: it is neither" >&2)
