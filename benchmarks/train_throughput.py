"""Training throughput (tokens/s) of the tiny run with AdaBound, AMSBound, RAdam and torch's fused AdamW,
and of AdaBound under DeepSpeed ZeRO-3 against FSDP2.

Same pipeline for all: configs/tiny.yaml (plus any overrides given) -> the packed embedded
corpus -> ``bigbatch.training.builders.setup`` (batch plan, Llama model, DeepSpeed engine with the
config's ZeRO stage) -> the training loop's step (``DeepSpeedEngine.train_step``); only the optimizer
differs. AdamW is ``torch.optim.AdamW(fused=True)``, torch's fused AdamW, as DeepSpeed's client optimizer.

The engines live in the same ``N`` processes (``torchrun --standalone``, gloo on CPU) and take
turns in short slices of ``--steps`` optimizer steps, in a rotating order, after ``--warmup`` steps
each (one-time kernel compilation). Interleaving makes the comparison fair on a shared machine
whose load drifts over minutes: every optimizer sees the same conditions. Reported: tokens/s per
optimizer (total tokens / total time) and its ratio to fused AdamW, plus the median of the
per-round ratios (robust to load spikes). Goal: >= 0.97.

With ``--offload`` the rows are ZeRO-3 with the optimizer offloaded to the host (AdaBound, AMSBound,
RAdam) against DeepSpeed's own AdamW, which DeepSpeed runs as its CPUAdam there.

    python benchmarks/train_throughput.py [--nproc 2] [--rounds 12] [--steps 10] [--warmup 20] [--offload] [-- --section.key V ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ADAM_HPARAMS = "{lr: 3.0e-3, betas: [0.9, 0.99], eps: 1.0e-8, weight_decay: 0.0}"
OPTIMIZERS = {
    "adabound": ["--optim.name", "adabound"],
    "amsbound": ["--optim.name", "amsbound"],
    "radam": ["--optim.name", "radam", "--optim.hparams", "{lr: 3.0e-3, betas: [0.9, 0.99], eps: 1.0e-8}"],
    "adamw-torch-fused": ["--optim.name", "adamw",
                          "--optim.hparams", ADAM_HPARAMS,
                          "--optim.kwargs", "{fused: true}"],
    # the two engines on the same model and optimizer: DeepSpeed ZeRO-3 and FSDP2
    "adabound-zero3": ["--optim.name", "adabound", "--deepspeed.zero_stage", "3"],
    "adabound-fsdp2": ["--optim.name", "adabound", "--train.engine", "fsdp2"],
}
REFERENCE = "adamw-torch-fused"

# --offload: ZeRO-3 with the optimizer on the host (configs/deepspeed/zero3_offload.json), where the
# optimizer step runs on the CPU while the accelerators wait; the reference is DeepSpeed's own AdamW
# (its CPUAdam under offload) on the same engine and hyperparameters as RAdam and AdamW above.
OFFLOAD_CONFIG = ["--deepspeed.config", "configs/deepspeed/zero3_offload.json", "--deepspeed.zero_stage", "3"]
OFFLOAD = {
    "adabound-offload": ["--optim.name", "adabound", *OFFLOAD_CONFIG],
    "amsbound-offload": ["--optim.name", "amsbound", *OFFLOAD_CONFIG],
    "radam-offload": OPTIMIZERS["radam"] + OFFLOAD_CONFIG,
    # DeepSpeed's CPU Adam by its class path: the client optimizer is the very class DeepSpeed builds for
    # an "AdamW" block under offload (adamw_mode), on the same engine and hyperparameters
    "deepspeed-cpuadam": ["--optim.name", "deepspeed.ops.adam.DeepSpeedCPUAdam", "--optim.hparams", ADAM_HPARAMS,
                          "--optim.kwargs", "{adamw_mode: true}", *OFFLOAD_CONFIG],
}
OFFLOAD_REFERENCE = "deepspeed-cpuadam"


def worker(args) -> None:
    import torch.distributed as dist

    from bigbatch import distributed as bbdist
    from bigbatch.training.config import load_config, parse_overrides
    from bigbatch.data.blocks import GlobalBatchLoader
    from bigbatch.data.run_data import load_run_data
    from bigbatch.training.builders import setup

    extra = parse_overrides(args.overrides)
    cases, reference = (OFFLOAD, OFFLOAD_REFERENCE) if args.offload else (OPTIMIZERS, REFERENCE)
    cfgs = {name: load_config(REPO / args.config, parse_overrides(flags) + extra) for name, flags in cases.items()}
    first = next(iter(cfgs.values()))
    info = bbdist.init_training_process(first.train.threads)
    tok, data, _ = load_run_data(first, info)

    runs = {}
    for name, cfg in cfgs.items():
        r = setup(cfg, info.world_size, tok, data.seq_len)
        loader = GlobalBatchLoader(data.train, micro_batch=r.plan.micro_batch, grad_accum=r.plan.grad_accum,
                                   rank=info.rank, world_size=info.world_size, seed=cfg.train.seed)
        runs[name] = (r, loader)
    tokens_per_step = first.batch.reference_global_batch * data.seq_len

    def steps(name: str, n: int) -> float:
        r, loader = runs[name]
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            r.engine.train_step(loader.next_step(), info.device)
        dist.barrier()
        return time.perf_counter() - t0

    for name in runs:
        steps(name, args.warmup)
    names = list(runs)
    seconds = {n: 0.0 for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        if rnd % 2:
            order.reverse()
        for name in order:
            dt = steps(name, args.steps)
            seconds[name] += dt
            per_round[name].append(args.steps * tokens_per_step / dt)
    if info.is_main:
        ref_total = args.rounds * args.steps * tokens_per_step / seconds[reference]
        r0 = runs[names[0]][0]
        print(f"{args.config} {' '.join(args.overrides)}: {info.world_size} processes, ZeRO-"
              f"{r0.engine.zero_stage}, global batch {r0.plan.global_batch} x {data.seq_len} "
              f"tokens, {args.rounds} rounds x {args.steps} steps per optimizer after {args.warmup} warm-up steps")
        print(f"{'optimizer':<20} {'tokens/s':>10} {'ratio':>7} {'median round ratio':>19}")
        for name in names:
            total = args.rounds * args.steps * tokens_per_step / seconds[name]
            med = statistics.median(a / b for a, b in zip(per_round[name], per_round[reference]))
            flag = "" if name == reference or name.endswith(("-zero3", "-fsdp2")) else \
                ("  ok" if total / ref_total >= 0.97 else "  < 0.97")
            basic = getattr(getattr(runs[name][0].engine, "ds_engine", None), "basic_optimizer", None)
            kind = f"  ({type(basic).__name__})" if args.offload else ""
            print(f"{name:<20} {total:10,.0f} {total / ref_total:7.3f} {med:19.3f}{flag}{kind}")
        if args.offload:
            bbdist.destroy()
            return
        z3, f2 = seconds["adabound-zero3"], seconds["adabound-fsdp2"]
        med = statistics.median(a / b for a, b in zip(per_round["adabound-fsdp2"], per_round["adabound-zero3"]))
        print(f"FSDP2 / DeepSpeed ZeRO-3 tokens/s (AdaBound, same model): {z3 / f2:.3f} (median round {med:.3f})")
    bbdist.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per slice")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--offload", action="store_true", help="ZeRO-3 offload rows against DeepSpeed's CPUAdam")
    p.add_argument("overrides", nargs="*", help="train.py overrides for all runs, after --")
    args = p.parse_args()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        worker(args)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--config", args.config, "--rounds", str(args.rounds), "--steps", str(args.steps),
           "--warmup", str(args.warmup), *(["--offload"] if args.offload else []), "--", *args.overrides]
    sys.exit(subprocess.run(cmd, cwd=REPO, env=env).returncode)


if __name__ == "__main__":
    main()
