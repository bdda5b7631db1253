#!/usr/bin/env bash
# The GPU checks in one command, on one GPU, in a few minutes: equality with the CPU kernel, kernel
# launches per step, step time against torch's fused Adam (fp32/bf16, 100M and 1B parameters) and
# train.py tokens/s in bf16 (benchmarks/gpu_check.py). Uses .venv when there is one, else python3
# (a GPU machine with torch, deepspeed and transformers installed: pip install -e . first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py "$@"
