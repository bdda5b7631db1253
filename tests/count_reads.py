"""train.py with a count of what bigbatch's own code reads from the device and the collectives it starts.

Used by tests/test_step_reads.py as ``torchrun ... tests/count_reads.py --config ... --out DIR``. Before
train.py starts, torch's value-reading methods (``item``, ``tolist``, ``__float__``, ``__int__``,
``__index__``, ``__bool__``, ``cpu``) and torch.distributed's collectives are wrapped to count the calls
whose caller is a file under ``bigbatch/``. A test-only callback writes each rank's counts at the start of
steps ``FIRST`` and ``LAST`` to ``DIR/reads_rank<R>.json``: their difference is what the steps in between
cost, with no start-up, evaluation or final save in it.

Reads of a 0-d float32 CPU tensor by ``bigbatch/optim`` are not counted: those are the optimizers' step
counters, which live on the host on every device (as torch's Adam keeps them), so reading one never
waits for a GPU.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

FIRST, LAST = 20, 60
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "bigbatch") + os.sep
OPTIM = os.path.join(PACKAGE, "optim") + os.sep
COUNTS = {"reads": 0, "collectives": 0, "where": {}, "library": {}}  # library: DeepSpeed's and torch's own, by file


def _caller_in_bigbatch(depth: int = 2) -> str | None:
    code = sys._getframe(depth).f_code
    return f"{code.co_filename}:{code.co_name}" if code.co_filename.startswith(PACKAGE) else None


def _library(name: str) -> None:
    """A read or collective of another library (DeepSpeed, torch.distributed's own), for the record."""
    code = sys._getframe(2).f_code
    if "/deepspeed/" in code.co_filename:
        key = f"{name} deepspeed/{code.co_filename.split('/deepspeed/', 1)[1]}:{code.co_name}"
        COUNTS["library"][key] = COUNTS["library"].get(key, 0) + 1


def _count_read(name: str, original):
    def wrapper(self, *args, **kwargs):
        _library(name)
        where = _caller_in_bigbatch()
        if where is not None and not (where.startswith(OPTIM) and self.dim() == 0 and self.device.type == "cpu"
                                      and self.dtype == torch.float32):
            COUNTS["reads"] += 1
            COUNTS["where"][f"{name} {where}"] = COUNTS["where"].get(f"{name} {where}", 0) + 1
        return original(self, *args, **kwargs)

    return wrapper


def _count_collective(name: str, original):
    def wrapper(*args, **kwargs):
        _library(name)
        where = _caller_in_bigbatch()
        if where is not None:
            COUNTS["collectives"] += 1
            COUNTS["where"][f"{name} {where}"] = COUNTS["where"].get(f"{name} {where}", 0) + 1
        return original(*args, **kwargs)

    return wrapper


for _name in ("item", "tolist", "__float__", "__int__", "__index__", "__bool__", "cpu"):
    setattr(torch.Tensor, _name, _count_read(_name, getattr(torch.Tensor, _name)))
for _name in ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
              "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor", "barrier", "gather", "scatter",
              "reduce", "all_to_all"):
    setattr(dist, _name, _count_collective(_name, getattr(dist, _name)))


def _snapshot_callbacks(out: str):
    from bigbatch.training.callbacks import Callback

    class Snapshot(Callback):
        priority = 0

        def __init__(self):
            self.seen = {}

        def pre_step(self, trainer) -> None:
            if trainer.step in (FIRST, LAST):
                self.seen[trainer.step] = json.loads(json.dumps(COUNTS))
            if trainer.step == LAST:
                path = os.path.join(out, f"reads_rank{trainer.info.rank}.json")
                with open(path, "w") as fh:
                    json.dump(self.seen, fh)

    return Snapshot()


def main() -> None:
    out = sys.argv[sys.argv.index("--out") + 1]
    import bigbatch.training.callbacks as callbacks

    original = callbacks.default_callbacks

    def with_snapshot(cfg, **kwargs):
        return [_snapshot_callbacks(out), *original(cfg, **kwargs)]

    callbacks.default_callbacks = with_snapshot
    sys.path.insert(0, REPO)
    sys.argv = [os.path.join(REPO, "train.py"), *sys.argv[1:]]
    import train

    train.default_callbacks = with_snapshot
    sys.exit(train.main())


if __name__ == "__main__":
    main()
