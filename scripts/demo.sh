#!/usr/bin/env bash
# The main job on its embedded default, from a fresh clone: set up .venv, then pretrain the tiny
# Llama of configs/tiny.yaml with AdaBound in 2 processes (gloo on CPU, NCCL on GPU) on text that
# ships with Python (no download), and export it as a Hugging Face model to runs/tiny/hf. Extra
# arguments are train.py overrides, e.g. --train.max_steps 50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/torchrun --standalone --nproc_per_node 2 train.py --config configs/tiny.yaml \
    --out runs/tiny --overwrite --checkpoint.export_hf true "$@"
