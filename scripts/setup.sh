#!/usr/bin/env bash
# Create .venv and install ftkit with its test tools. Torch is installed first, pinned, so that no
# dependency can pull a multi-GB CUDA build onto a CPU machine (on a GPU machine, install the CUDA
# torch you want before running this: an installed torch satisfies every dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==${FTKIT_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
echo "ftkit installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
