"""ZeRO-Offload: the optimizer step of bigbatch's AdaBound/AMSBound/RAdam inside a real DeepSpeed engine
with ``offload_optimizer: cpu``, against DeepSpeed's own CPUAdam on the same engine, in one run.

Two gloo processes (``--world``), ZeRO-2 and ZeRO-3, a model of about ``--params`` parameters (a stack
of square linear layers). DeepSpeed steps the client optimizer on each rank's CPU partition of the
fp32 master weights; the time inside that call is measured (summed over ZeRO-3's sub-groups) for
``--steps`` steps after 2 warm-up steps, and its median printed with the whole ``engine.step()`` and
the ratio to CPUAdam's (goal for AdaBound and RAdam: <= 1.0). Every engine runs in fresh processes
(DeepSpeed keeps memory of destroyed engines); ``--rounds`` rounds in alternating order spread a
drifting machine load over all of them (the median of the rounds is printed).

    python benchmarks/offload_step.py [--params 100e6] [--world 2] [--steps 6] [--rounds 3] [--stages 2 3]
    python benchmarks/offload_step.py --rounds 1 --stages 2 --optimizers "DeepSpeed CPUAdam" "bigbatch AdaBound" --profile 12
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bigbatch.distributed import init_distributed  # noqa: E402
from bigbatch.launcher.env import free_port  # noqa: E402

OPTIMIZERS = {  # the config's optimizer block: DeepSpeed's AdamW type is its CPUAdam under offload
    "DeepSpeed CPUAdam": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
    "bigbatch AdaBound": {"type": "AdaBound", "params": {"lr": 1e-3}},
    "bigbatch AMSBound": {"type": "AMSBound", "params": {"lr": 1e-3}},
    "bigbatch RAdam": {"type": "RAdam", "params": {"lr": 1e-3}},
}


def _engine(stage: int, block: dict, width: int, layers: int):
    from bigbatch.sharding import build_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    cfg = {"train_batch_size": 2 * torch.distributed.get_world_size(), "train_micro_batch_size_per_gpu": 2,
           "optimizer": block, "steps_per_print": 10**9,
           "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": False}}}
    engine, _, _ = build_engine(model, cfg)
    spent = []
    opt = engine.basic_optimizer
    inner = opt.step

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        spent.append(time.perf_counter() - t0)
        return out

    opt.step = timed
    return engine, spent


def _worker(rank: int, world: int, args, stage: int, name: str, port: int, out_path: str) -> None:
    """One engine (``stage``, optimizer ``name``) in its own process group: DeepSpeed does not give all
    of an engine's memory back when it is destroyed, so each lives in fresh processes."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("ERROR")
    init_distributed(backend="gloo", use_deepspeed=True, timeout_s=1800)
    width = 2048
    layers = max(1, round(args.params / (width * width)))
    x = torch.randn(2, width)
    engine, spent = _engine(stage, OPTIMIZERS[name], width, layers)
    optim_times, step_times = [], []
    profiler = cProfile.Profile() if args.profile and rank == 0 else None
    for i in range(args.steps + 2):
        engine.backward(engine(x).square().mean())
        spent.clear()
        dist.barrier()
        t0 = time.perf_counter()
        if profiler is not None and i >= 2:
            profiler.enable()
        engine.step()
        if profiler is not None and i >= 2:
            profiler.disable()
        dist.barrier()
        if i >= 2:  # warm-up: kernel builds, first allocations
            step_times.append(time.perf_counter() - t0)
            optim_times.append(sum(spent))
    # the slowest rank's optimizer time bounds the step
    t = torch.tensor([statistics.median(optim_times), statistics.median(step_times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if profiler is not None:
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(args.profile)
        print(f"--- ZeRO-{stage}, {name}: engine.step() of rank 0, {args.steps} steps, by own time\n"
              + text.getvalue().split("\n", 6)[-1], flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"optimizer_ms": 1e3 * float(t[0]), "engine_step_ms": 1e3 * float(t[1]),
                       "params": layers * width * width}, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=100e6)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per engine and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N functions with the most own time inside rank 0's engine.step()")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # CPUAdam's OpenMP and our kernel: one thread per rank
    runs: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        names = [n for n in OPTIMIZERS if n in args.optimizers]
        for rnd in range(args.rounds):  # the order alternates per round
            for stage in args.stages:
                for name in (names if rnd % 2 == 0 else names[::-1]):
                    mp.spawn(_worker, args=(args.world, args, stage, name, free_port(), out), nprocs=args.world,
                             join=True)
                    with open(out) as f:
                        runs.setdefault((stage, name), []).append(json.load(f))
    rows = [{"stage": stage, "optimizer": name, "params": rs[0]["params"],
             "optimizer_ms": statistics.median(r["optimizer_ms"] for r in rs),
             "engine_step_ms": statistics.median(r["engine_step_ms"] for r in rs)} for (stage, name), rs in runs.items()]
    print(f"ZeRO-Offload (offload_optimizer: cpu), {args.world} gloo processes x 1 thread, "
          f"{rows[0]['params'] / 1e6:.0f}M fp32 params, median of {args.rounds} x {args.steps} steps, slowest rank")
    for stage in args.stages:
        ref = next(r for r in rows if r["stage"] == stage and r["optimizer"] == "DeepSpeed CPUAdam")
        print(f"ZeRO-{stage}: {'optimizer':<20} {'optimizer step':>15} {'engine.step()':>14} {'vs CPUAdam':>11}")
        for r in (r for r in rows if r["stage"] == stage):
            ratio = r["optimizer_ms"] / ref["optimizer_ms"]
            goal = "" if r["optimizer"] in ("DeepSpeed CPUAdam", "bigbatch AMSBound") else \
                ("  (goal <= 1.0: met)" if ratio <= 1.0 else "  (goal <= 1.0: NOT met)")
            print(f"        {r['optimizer']:<20} {r['optimizer_ms']:12.1f} ms {r['engine_step_ms']:11.1f} ms "
                  f"{ratio:10.2f}x{goal}")


if __name__ == "__main__":
    main()
