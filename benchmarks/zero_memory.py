"""Optimizer-state bytes held per rank under DeepSpeed ZeRO and FSDP2, against the ideal split.

    .venv/bin/python benchmarks/zero_memory.py [--worlds 1 2 4] [--hidden 250] [--layers 8] [--json out.json]

For each world size N (one process group of N real gloo processes on CPU), each optimizer
(AdaBound, AMSBound, RAdam) and each ZeRO stage 0-3, an engine is built with
``bigbatch.sharding.build_engine`` and takes one step; then every tensor in the client
optimizer's state on each rank is counted (unique storages, ``step`` scalars included). The
``fsdp2`` rows shard the same model with ``fully_shard`` (``bigbatch.sharding.fsdp2_engine``) and count
the local shards of the optimizer's DTensor states.

    ideal = number of per-element states (2, or 3 with AMSBound's max_exp_avg_sq) x 4 bytes x P / N

with P the trainable parameter count; the table shows the largest rank's bytes / ideal. Stage 0
does not shard (ratio N by design); the goal is <= 1.02 at N = 2 and 4 for stages 1-3 and FSDP2. The
default model (``--layers`` linear layers of width ``--hidden`` = 250, not a multiple of 4)
makes ZeRO's alignment padding visible rather than hiding it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.multiprocessing as mp

from bigbatch.distributed import init_distributed
from bigbatch.launcher.env import free_port

OPTS = {"adabound": ("AdaBound", 2), "amsbound": ("AMSBound", 3), "radam": ("RAdam", 2)}
STAGES = (0, 1, 2, 3, "fsdp2")


def _model(hidden: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.Tanh()]
    return torch.nn.Sequential(*mods)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (each storage once)."""
    seen, total = set(), 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                v = v.to_local() if hasattr(v, "to_local") else v  # a DTensor: this rank's shard
                key = (v.untyped_storage().data_ptr(), v.device.type)
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
    return total


def _worker(rank: int, world: int, args, port: int, out_path: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), BIGBATCH_OPTIM_IMPL="foreach")
    torch.set_num_threads(1)
    import logging

    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    from bigbatch.sharding import build_engine

    ds_logger.setLevel(logging.ERROR)
    init_distributed(backend="gloo", use_deepspeed=True, timeout_s=300)
    rows = []
    for opt, (type_name, n_states) in OPTS.items():
        for stage in STAGES:
            model = _model(args.hidden, args.layers)
            n_params = sum(p.numel() for p in model.parameters())
            x = torch.randn(2, args.hidden)
            if stage == "fsdp2":
                from bigbatch.optim import get_optimizer_class
                from bigbatch.sharding.fsdp2_engine import shard_model

                shard_model(model)
                optimizer = get_optimizer_class(opt)(model.parameters(), lr=1e-3)
                model(x).square().mean().backward()
                optimizer.step()
                engine = None
            else:
                cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                       "optimizer": {"type": type_name, "params": {"lr": 1e-3}},
                       "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                       "steps_per_print": 10 ** 9}
                engine, _, _ = build_engine(model, cfg)
                engine.backward(engine(x).square().mean())
                engine.step()
                optimizer = engine.basic_optimizer
            mine = torch.tensor([state_bytes(optimizer)], dtype=torch.float64)
            all_ranks = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(all_ranks, mine)
            ideal = n_states * 4 * n_params / world
            worst = max(float(t) for t in all_ranks)
            rows.append({"world": world, "optimizer": opt, "stage": stage, "params": n_params,
                         "bytes_max_rank": worst, "ideal": ideal, "ratio": worst / ideal})
            if engine is not None:
                engine.destroy()
            dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.barrier()  # leave the group together (see tests/sharding_worker.py)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--hidden", type=int, default=250)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out = os.path.join(tmp, f"w{world}.json")
            mp.spawn(_worker, args=(world, args, free_port(), out), nprocs=world, join=True)
            with open(out) as f:
                rows += json.load(f)
    print(f"optimizer-state bytes per rank (max over ranks) / ideal; P = {rows[0]['params']} params")
    print(f"{'optimizer':<10} {'stage':>5} " + " ".join(f"{'N=' + str(w):>16}" for w in args.worlds))
    ok = True
    for opt in OPTS:
        for stage in STAGES:
            cells = []
            for w in args.worlds:
                r = next(r for r in rows if r["world"] == w and r["optimizer"] == opt and r["stage"] == stage)
                cells.append(f"{r['bytes_max_rank'] / 2**20:7.3f}MiB {r['ratio']:6.4f}")
                if stage != 0 and w > 1 and r["ratio"] > 1.02:
                    ok = False
            print(f"{opt:<10} {stage:>5} " + " ".join(f"{c:>16}" for c in cells))
    print("goal (stages 1-3 and fsdp2, N>1: ratio <= 1.02):", "met" if ok else "NOT met")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
