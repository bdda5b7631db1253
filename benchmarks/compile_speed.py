"""Training tokens/s with ``train.compile`` (each decoder block under torch.compile) against the eager model,
side by side in one process, for configs/tiny.yaml and configs/125m.yaml.

Per config, two engines are built from the same config in the same process (``bigbatch.training.builders.setup``,
DeepSpeed, one rank), one with ``--train.compile true``; each runs ``--warmup`` steps first (the compiled one
compiles there: the first step's time is reported), then they take turns in ``--rounds`` slices of ``--steps``
optimizer steps (``--steps-125m`` for 125m), in alternating order, so that a machine whose load drifts slows both alike. Reported: tokens/s
of each (timed tokens / timed seconds; ``timed``: the steps timed per model), the ratio compiled / eager,
and the median of the per-round ratios.

125m runs here on the embedded corpus with a 2048-token BPE, the embedding padded to GPT-2's 50304 rows (the
config's shapes), sequences of 256 tokens, a global batch of ``--batch-125m`` sequences in one micro batch,
fp32, ZeRO-0. The load average before and after is printed: a ratio measured under load is still a fair
comparison, the absolute tokens/s are not.

    python benchmarks/compile_speed.py [--configs tiny 125m] [--rounds 4] [--steps 3] [--steps-125m 1]
        [--warmup 2] [--batch-125m 4]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "tiny": ("configs/tiny.yaml", []),
    "125m": ("configs/125m.yaml", [
        "--data.source", "embedded", "--data.embedded", "stdlib", "--data.max_chars", "3000000",
        "--data.val_fraction", "0.02", "--data.num_proc", "1", "--tokenizer.kind", "bpe",
        "--tokenizer.vocab_size", "2048", "--model.vocab_size", "50304", "--data.seq_len", "256",
        "--deepspeed.config", "null", "--deepspeed.zero_stage", "0", "--deepspeed.precision", "fp32"]),
}


def overrides(name: str, args) -> list[str]:
    path, extra = CONFIGS[name]
    if name == "125m":
        b = str(args.batch_125m)
        extra = extra + ["--batch.reference_global_batch", b, "--batch.global_batch", b,
                         "--batch.micro_batch_sizes", f"[{b}]"]
    return ["--config", path, *extra]


def bench(name: str, args, info) -> dict:
    from bigbatch.training.builders import setup
    from bigbatch.training.config import load_config, parse_overrides
    from bigbatch.data.blocks import GlobalBatchLoader
    from bigbatch.data.run_data import prepare_data

    argv = overrides(name, args)
    path, flags = argv[1], parse_overrides(argv[2:])
    cfgs = {"eager": load_config(REPO / path, flags),
            "compiled": load_config(REPO / path, flags + [("train.compile", "true")])}
    tok, data, _ = prepare_data(cfgs["eager"], info)
    runs = {}
    for mode, cfg in cfgs.items():
        r = setup(cfg, info.world_size, tok, data.seq_len)
        loader = GlobalBatchLoader(data.train, micro_batch=r.plan.micro_batch, grad_accum=r.plan.grad_accum,
                                   rank=info.rank, world_size=info.world_size, seed=cfg.train.seed)
        runs[mode] = (r, loader)
    plan = runs["eager"][0].plan
    tokens_per_step = plan.global_batch * data.seq_len

    def steps(mode: str, n: int) -> float:
        r, loader = runs[mode]
        t0 = time.perf_counter()
        for _ in range(n):
            r.engine.train_step(loader.next_step(), info.device)
        return time.perf_counter() - t0

    per_slice = args.steps_125m if name == "125m" else args.steps
    first = {mode: steps(mode, 1) for mode in runs}  # the compiled model compiles here
    for mode in runs:
        steps(mode, args.warmup - 1)
    seconds = {mode: 0.0 for mode in runs}
    rounds: dict[str, list[float]] = {mode: [] for mode in runs}
    for rnd in range(args.rounds):
        for mode in (("eager", "compiled") if rnd % 2 == 0 else ("compiled", "eager")):
            dt = steps(mode, per_slice)
            seconds[mode] += dt
            rounds[mode].append(dt)
    timed = args.rounds * per_slice * tokens_per_step
    out = {"config": name, "params": sum(p.numel() for p in runs["eager"][0].model.parameters()) / 1e6,
           "batch": f"{plan.global_batch}x{data.seq_len}", "first": first, "steps": args.rounds * per_slice,
           "tokens_per_s": {m: timed / s for m, s in seconds.items()},
           "median_round_ratio": statistics.median(e / c for e, c in zip(rounds["eager"], rounds["compiled"]))}
    del runs
    gc.collect()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per slice (tiny)")
    p.add_argument("--steps-125m", type=int, default=1, help="optimizer steps per slice (125m)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model, the first compiles (>= 1)")
    p.add_argument("--batch-125m", type=int, default=4, help="sequences of 256 tokens per step for 125m")
    args = p.parse_args()
    if min(args.warmup, args.rounds, args.steps, args.steps_125m, args.batch_125m) < 1:
        p.error("--warmup, --rounds, --steps, --steps-125m and --batch-125m must be >= 1")
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    import torch

    from bigbatch import distributed as bbdist

    info = bbdist.init_training_process()
    print(f"torch {torch.__version__}, {info.device}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f} at the start; {args.rounds} rounds per model after {args.warmup} warm-up steps")
    print(f"{'config':<6} {'params':>8} {'batch':>7} {'timed':>6} {'eager tok/s':>12} {'compiled tok/s':>15} "
          f"{'ratio':>6} {'median round':>13} {'1st step eager':>15} {'1st step compiled':>18}", flush=True)
    for name in args.configs:  # a row as each config ends
        r = bench(name, args, info)
        t = r["tokens_per_s"]
        print(f"{r['config']:<6} {r['params']:7.1f}M {r['batch']:>7} {r['steps']:6d} {t['eager']:12,.0f} "
              f"{t['compiled']:15,.0f} {t['compiled'] / t['eager']:6.3f} {r['median_round_ratio']:13.3f} "
              f"{r['first']['eager']:14.1f}s {r['first']['compiled']:17.1f}s", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    bbdist.destroy()


if __name__ == "__main__":
    main()
