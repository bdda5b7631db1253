#!/usr/bin/env bash
# Gathers here, into DIR (default .whl, git-ignored), the wheels that the lent GPU machine's image lacks for
# benchmarks/gpu_check.sh, which installs them there with pip --no-index --find-links DIR (no network there).
# The image (Python 3.12, x86-64) has torch, transformers, accelerate, tokenizers, safetensors, xxhash,
# pyyaml, matplotlib, numpy, psutil, ninja, einops, msgpack, py-cpuinfo; it lacks:
#   deepspeed, built here as pure Python (DS_BUILD_OPS=0: its ops JIT-compile there with nvcc when used),
#   and of its needs hjson and pydantic (pydantic-core, a binary for CPython 3.12, annotated-types,
#   typing-inspection; typing-extensions too, in case the image's is older than pydantic-core wants).
# datasets is not needed: train.py on the embedded corpus and prepare-data on local files never import it.
# The versions are the ones bigbatch is tested with here. Total about 5 MB (the device carries <= 64 MiB).
#   bash scripts/gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DIR"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$DIR" hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -1 "$DIR"
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $DIR"
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
    echo "gpu_wheels: $DIR holds more than 64 MiB, more than a device call carries" >&2
    exit 1
fi
