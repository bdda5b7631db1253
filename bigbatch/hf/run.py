"""Run an unmodified Hugging Face training script with bigbatch's optimizers, scaling rules and batch
schedules: ``python -m bigbatch.hf.run SCRIPT.py [script args]``.

Works under every launcher that runs a module: ``torchrun ... -m bigbatch.hf.run SCRIPT.py ...``,
``accelerate launch -m bigbatch.hf.run SCRIPT.py ...``, ``deepspeed --module bigbatch.hf.run SCRIPT.py
...``. It patches transformers (:func:`bigbatch.hf.install`), then runs the script as ``__main__``
with ``sys.argv = [SCRIPT.py, *args]`` and the script's folder first on ``sys.path``, as ``python
SCRIPT.py`` would. A transformers version it was not tested with, a missing script and a bad
bigbatch argument end with one line and exit 2.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m bigbatch.hf.run SCRIPT.py [script arguments]"


def _refuse(text: str) -> int:
    print(f"bigbatch.hf.run: {text}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(USAGE, file=sys.stderr)
        return 2 if not argv else 0
    script = argv[0]
    if not script.endswith(".py") or not os.path.isfile(script):
        return _refuse(f"SCRIPT={script!r}: not a Python file (.py) that exists; {USAGE}")
    from bigbatch.hf.patch import UntestedTransformers, install

    try:
        install()
    except UntestedTransformers as exc:
        return _refuse(str(exc))
    from bigbatch.hf.trainer import is_argument_error

    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except ValueError as exc:
        if not is_argument_error(exc):
            raise
        return _refuse(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
