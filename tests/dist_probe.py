"""A tiny distributed job for the launcher tests (no model: seconds, not minutes).

    python tests/dist_probe.py --out DIR [--steps N] [--step-seconds S] [--wait-at N] [--mpi4py] [--strip-mpi-env]

Every rank: ``bigbatch.distributed.init_distributed()`` (gloo), writes ``DIR/rank<R>.json`` (its
topology, host name, an all-reduce result), then runs ``--steps`` steps of one all-reduce each.
SIGUSR1 or SIGTERM: all ranks stop at the same step boundary, rank 0 writes ``DIR/ckpt.json``
(atomically) and every rank exits 75. A restart resumes from ``ckpt.json``; when the world size
changed it logs the rescaled batch (``rescaled: world_size A -> B ...``). Rank 0 appends each
finished step to ``DIR/steps.log`` (so a test sees that no step was lost or repeated) and writes
``DIR/done.json`` at the end. ``--wait-at N``: a run that starts before step N waits before it
(every rank, polling the signal flag together) until a signal arrives, after rank 0 writes
``DIR/waiting``: a test that signals after that file finds the checkpoint at step N. ``--mpi4py``: also all-reduce through mpi4py and record it.
``--strip-mpi-env``: drop the launchers' rank variables (MPI's and SLURM's) first, so only mpi4py
discovery remains.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

PREEMPT_EXIT = 75
MICRO_BATCH = 4  # per rank; the global batch is MICRO_BATCH * world size
REFERENCE_LR = 1e-3  # at the first run's global batch; square-root rule on a resize


def _atomic_json(path: str, obj) -> None:
    from bigbatch.atomic import write_text

    write_text(path, json.dumps(obj))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--step-seconds", type=float, default=0.0)
    p.add_argument("--wait-at", type=int, default=None)
    p.add_argument("--mpi4py", action="store_true")
    p.add_argument("--strip-mpi-env", action="store_true")
    args = p.parse_args()

    if args.strip_mpi_env:
        for k in list(os.environ):
            if k.startswith(("OMPI_COMM_WORLD_", "PMI_", "MPI_LOCAL", "MV2_COMM_WORLD_", "SLURM_STEP",
                             "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NPROCS")):
                del os.environ[k]
    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    import torch
    import torch.distributed as dist

    from bigbatch.distributed import init_distributed

    torch.set_num_threads(1)
    topo = init_distributed(backend="gloo")
    rank, world = topo.rank, topo.world_size
    os.makedirs(args.out, exist_ok=True)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    record = {**topo.__dict__, "hosts": list(topo.hosts), "hostname": socket.gethostname(),
              "allreduce": t.item(), "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
              "pid": os.getpid()}
    if args.mpi4py:
        from mpi4py import MPI

        record["mpi_rank"] = MPI.COMM_WORLD.Get_rank()
        record["mpi_size"] = MPI.COMM_WORLD.Get_size()
        record["mpi_allreduce"] = MPI.COMM_WORLD.allreduce(rank + 1)
    _atomic_json(os.path.join(args.out, f"rank{rank}.json"), record)

    ckpt_path = os.path.join(args.out, "ckpt.json")
    start = 0
    if os.path.exists(ckpt_path):
        with open(ckpt_path) as fh:
            ckpt = json.load(fh)
        start = ckpt["step"]
        if ckpt["world_size"] != world and rank == 0:
            kappa = world / ckpt["world_size"]
            print(f"rescaled: world_size {ckpt['world_size']} -> {world} global_batch "
                  f"{ckpt['world_size'] * MICRO_BATCH} -> {world * MICRO_BATCH} kappa {kappa:g} "
                  f"lr {ckpt['lr']:g} -> {ckpt['lr'] * kappa ** 0.5:g}", flush=True)
        lr = ckpt["lr"] * (world / ckpt["world_size"]) ** 0.5
    else:
        lr = REFERENCE_LR
    if rank == 0:
        print(f"probe: rank 0 of {world} on {socket.gethostname()} source {topo.source} "
              f"start step {start}", flush=True)
        open(os.path.join(args.out, f"running.{os.environ.get('SLURM_RESTART_COUNT', '0')}"), "w").close()

    for step in range(start, args.steps):
        waited = False
        while True:
            flag = torch.tensor([1.0 if stop["sig"] else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 or step != args.wait_at or start >= step:
                break
            if rank == 0 and not waited:  # after one poll: every rank is waiting
                open(os.path.join(args.out, "waiting"), "w").close()
            waited = True
            time.sleep(0.05)
        if flag.item() > 0:  # every rank stops before the same step
            if rank == 0:
                _atomic_json(ckpt_path, {"step": step, "world_size": world, "lr": lr})
                print(f"probe: {stop['sig'] or 'peer signal'}: checkpoint at step {step}, exit "
                      f"{PREEMPT_EXIT}", flush=True)
            dist.barrier()
            dist.destroy_process_group()
            return PREEMPT_EXIT
        x = torch.tensor([float(step)])
        dist.all_reduce(x)
        if rank == 0:
            with open(os.path.join(args.out, "steps.log"), "a") as fh:
                fh.write(f"{step} {world} {x.item() / world:g}\n")
        time.sleep(args.step_seconds)
    if rank == 0:
        _atomic_json(os.path.join(args.out, "done.json"), {"steps": args.steps, "world_size": world})
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
