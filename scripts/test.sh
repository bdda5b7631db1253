#!/usr/bin/env bash
# The whole test suite from a fresh clone: set up .venv, install the system packages the real
# SLURM/MPI tests use (Debian's slurmctld/slurmd/munge/libpmix2; needs root or sudo), run pytest.
# The two installs run side by side (pip on one core, apt). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/slurm_cluster.sh install &
slurm=$!
setup=0
bash scripts/setup.sh || setup=$?
wait "$slurm"  # also when setup failed: apt is never left half-done
[ "$setup" = 0 ] || exit "$setup"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
