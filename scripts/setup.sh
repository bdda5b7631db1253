#!/usr/bin/env bash
# Create .venv and install bigbatch with its dev extra. constraints-dev.txt pins torch to the CPU
# build 2.13.0 so that no multi-GB CUDA build is downloaded on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# pip byte-compiles what it installs one file after another (40 s of its 64 here); compileall does it on every
# core. Our own code too: with PYTHONDONTWRITEBYTECODE set, every process would compile it again. A few
# third-party files in a newer Python's syntax do not compile, under pip as here: compileall's status says
# nothing about this install.
.venv/bin/python -m pip install -q --no-compile -c constraints-dev.txt -e ".[dev]"
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
.venv/bin/python -m compileall -q -j 0 "$site" bigbatch tests >/dev/null || true
