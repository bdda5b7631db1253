"""Run bigbatch's optimizers on FSDP2 (``fully_shard``) DTensor parameters in ONE process group of
``--world`` real processes (gloo, CPU), case after case; rank 0 writes ``{case: result}`` as JSON.

    python tests/fsdp2_worker.py --world 2 --cases cases.json --out results.json

A case: optimizer, implementation (fused: the C kernel on the local shards; foreach; compiled),
steps. The model, data, parameter groups and scheduler are sharding_common's, so the unsharded
single-process reference of the DeepSpeed tests applies unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


import case_runner
import sharding_common as common

IMPL = {"fused": {"fused": True}, "foreach": {"foreach": True}, "compiled": {"fused": True}}


def run_case(case: dict, world: int, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bigbatch.optim import get_optimizer_class
    from bigbatch.sharding.fsdp2_checkpoint import full_state

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


if __name__ == "__main__":
    case_runner.main(run_case, deepspeed=False)
