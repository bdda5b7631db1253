"""Run a list of test cases in ONE process group of ``--world`` real gloo processes on CPU (spawned
here), case after case; rank 0 writes ``{case name: result}`` as JSON (an ``"error"`` entry holds a
traceback). Used by the workers of the sharding and FSDP2 tests: one launch pays the imports for
every case of a world size."""

from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bigbatch.atomic import write_text
from bigbatch.distributed import init_distributed
from bigbatch.launcher.env import free_port


def _worker(rank: int, world: int, run_case, cases: list, out_path: str, port: int, deepspeed: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if deepspeed:
        import logging

        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    init_distributed(backend="gloo", use_deepspeed=deepspeed, timeout_s=120)
    results = {}
    for case in cases:
        try:
            results[case["name"]] = run_case(case, world, rank)
        except Exception:  # recorded for the test to report; the other ranks fail the same way
            results[case["name"]] = {"error": traceback.format_exc()}
        dist.barrier()
    if rank == 0:
        write_text(out_path, json.dumps(results))
    # Every rank leaves the group together: a rank that tears its gloo pairs down while another is still
    # busy makes that one's transport thread see "connection closed" and abort the process.
    dist.barrier()
    dist.destroy_process_group()


def main(run_case, argv=None, *, deepspeed: bool) -> None:
    """The command line of a worker: ``--world N --cases cases.json --out results.json``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    with open(args.cases) as f:
        cases = json.load(f)
    mp.spawn(_worker, args=(args.world, run_case, cases, args.out, free_port(), deepspeed), nprocs=args.world,
             join=True)
