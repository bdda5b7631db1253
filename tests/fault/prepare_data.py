"""``bigbatch prepare-data`` with the test-only fault hooks of ``fault_hooks`` (a run that waits after
its K-th shard until the test's kill). Run with ``--workers 1``: the shards are then encoded in this
process, in order.

    python tests/fault/prepare_data.py --config data.yaml --out DIR --workers 1   # + BIGBATCH_TEST_* variables
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(HERE)))  # the checkout's bigbatch

import fault_hooks  # noqa: E402

if __name__ == "__main__":
    from bigbatch.data import prepare
    from bigbatch.training.config import load_config

    fault_hooks.install_shard_wait()
    sys.exit(prepare.main(load_config=load_config))
