#!/usr/bin/env bash
# The main job on its embedded default, from a fresh clone: set up, then run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/optimizer_demo.py "$@"
