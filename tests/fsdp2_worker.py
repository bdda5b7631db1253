"""Run bigbatch's optimizers on FSDP2 (``fully_shard``) DTensor parameters in ONE process group of
``--world`` real processes (gloo, CPU), case after case; rank 0 writes ``{case: result}`` as JSON.

    python tests/fsdp2_worker.py --world 2 --cases cases.json --out results.json

A case: optimizer, implementation (fused: the C kernel on the local shards; foreach; compiled),
steps. The model, data, parameter groups and scheduler are sharding_common's, so the unsharded
single-process reference of the DeepSpeed tests applies unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bigbatch.atomic import write_text
from bigbatch.launcher.env import free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sharding_common as common  # noqa: E402

IMPL = {"fused": {"fused": True}, "foreach": {"foreach": True}, "compiled": {"fused": True}}


def run_case(case: dict, world: int, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bigbatch.optim import get_optimizer_class
    from bigbatch.sharding.fsdp2 import full_state

    os.environ["BIGBATCH_NATIVE_KERNELS"] = "0" if case["impl"] == "compiled" else "1"
    model = common.make_model(0)
    mesh = init_device_mesh("cpu", (world,))
    for m in (model.fc1, model.fc2, model.fc3, model):
        fully_shard(m, mesh=mesh)
    hp = {k: v for k, v in common.HPARAMS[case["opt"]].items() if k != "foreach"}
    opt = get_optimizer_class(case["opt"])(common.param_groups(model, hp["lr"]), **hp, **IMPL[case["impl"]])
    sched = common.warmup(opt)
    gb, local = case["gb"], case["gb"] // world
    losses = []
    for t in range(case["steps"]):
        x, y = common.micro_batch(t, gb, world, rank, local, 0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total = loss.detach().double().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    local_state = next(iter(opt.state.values()))
    full = full_state(model, opt)
    return {"losses": losses,
            "full": {n: {"fp32": e["fp32"].tolist(), "state": {k: v.tolist() for k, v in e["state"].items()}}
                     for n, e in full.items()},
            "state_is_dtensor": type(local_state["exp_avg"]).__name__ == "DTensor",
            "local_numel": sum(s["exp_avg"].to_local().numel() for s in opt.state.values())}


def _worker(rank: int, world: int, cases: list, out_path: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for case in cases:
        try:
            results[case["name"]] = run_case(case, world, rank)
        except Exception:  # recorded for the test to report; the other ranks fail the same way
            results[case["name"]] = {"error": traceback.format_exc()}
        dist.barrier()
    if rank == 0:
        write_text(out_path, json.dumps(results))
    dist.barrier()  # leave the group together (see sharding_worker.py)
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    with open(args.cases) as f:
        cases = json.load(f)
    mp.spawn(_worker, args=(args.world, cases, args.out, free_port()), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
