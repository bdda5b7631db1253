#!/usr/bin/env bash
# Create .venv and install bigbatch with its dev extra. constraints-dev.txt pins torch to the CPU
# build 2.13.0 so that no multi-GB CUDA build is downloaded on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-dev.txt -e ".[dev]"
