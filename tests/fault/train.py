"""The repository's train.py with the test-only fault hooks of ``fault_hooks`` (a run that waits at a
step or in a save until the test's fault arrives, NaN losses at chosen steps). Tests run it instead of
train.py, with the same arguments, under python, torchrun, srun and ``bigbatch submit`` (its name is
train.py so that submit treats it as train.py: ``--out`` becomes ``--resume`` on a requeue).

    python tests/fault/train.py --config configs/tiny.yaml --out DIR ...   # + BIGBATCH_TEST_* variables
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(1, REPO)  # after this directory (fault_hooks), before site-packages: the checkout's bigbatch

import fault_hooks  # noqa: E402


def load_train():
    """The repository's train.py as a module (not ``import train``: that name is this file)."""
    spec = importlib.util.spec_from_file_location("bigbatch_train_script", os.path.join(REPO, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    train = load_train()
    train.default_callbacks = fault_hooks.with_test_callbacks(train.default_callbacks)
    fault_hooks.install_save_wait()
    sys.exit(train.main())
