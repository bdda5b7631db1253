#!/usr/bin/env bash
# The GPU evidence in one command, on one GPU, in under 10 minutes (benchmarks/gpu_check.py): equality with
# the CPU kernel, kernel launches per step, optimizer step time against torch's fused Adam, train.py on a
# 125M Llama in bf16 (tokens/s, MFU and values read per step; AdaBound and fused AdamW, compile off and on),
# and the batch-growth runs on a 55M Llama (constant batch against batch.schedule auto, 50M tokens each).
# Uses .venv when there is one, else python3. On the lent GPU machine (no network, no deepspeed):
#   here:   bash scripts/gpu_wheels.sh          (the missing wheels into .whl, git-ignored)
#   there:  bash benchmarks/gpu_check.sh        (carry .whl: it installs them with pip --no-index first)
# Arguments go to gpu_check.py (--quick, --skip-science, --device cpu, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: deepspeed is not installed and .whl holds no wheels; run scripts/gpu_wheels.sh where pip works" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-cache-dir --find-links .whl deepspeed==0.19.8
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
