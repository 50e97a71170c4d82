#!/usr/bin/env bash
# The GPU measurements in one command, on a CUDA machine with nothing but this checkout (no hub access needed):
# sets up .venv if there is none (scripts/setup.sh), then trains a random-init ~1.1B Llama with LoRA bf16,
# QLoRA nf4 and full fine-tuning, each with sdpa, flash_attention_2 (if flash_attn imports) and padding-free
# batches, and writes tokens/s, MFU and peak memory beside `ftkit estimate` to bench/results/gpu-<device>.json.
#
#   bash bench/gpu.sh                      # options: --steps N --batch N --max-length N --gradient-checkpointing
#   bash bench/gpu.sh --dry-run            # CPU path (tiny model, 2 steps per case): checks the script
#
# BENCH_PYTHON=/path/to/python uses that interpreter (with ftkit importable) instead of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${BENCH_PYTHON:-}" ]; then
  PY=$BENCH_PYTHON
else
  [ -x .venv/bin/python ] || bash scripts/setup.sh
  PY=.venv/bin/python
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu.py "$@"
