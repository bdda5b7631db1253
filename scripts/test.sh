#!/usr/bin/env bash
# The whole test suite from a fresh clone: set up .venv, install the system packages the real
# SLURM/MPI tests use (Debian's slurmctld/slurmd/munge/libpmix2; needs root or sudo), run pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/slurm_cluster.sh install
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
