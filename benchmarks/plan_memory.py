"""``bigbatch plan``'s memory model against measurement: predicted per-rank memory of configs/125m.yaml
and configs/350m.yaml under DeepSpeed ZeRO-1/2/3 and FSDP2 (2 processes, CPU, float32) against the
peak resident memory each rank reached above its baseline.

    python benchmarks/plan_memory.py [--configs 125m 350m] [--engines zero1 zero2 zero3 fsdp2]
                                     [--seq-len 256] [--micro 2] [--steps 3] [--json out.json]

Each case is one ``torchrun --nproc_per_node 2`` of this file's worker (run under ``nice``, one case after
another): after imports and the process group (the baseline: VmRSS), it resets the kernel's high-water mark
(``/proc/self/clear_refs``), builds the model and engine with train.py's own ``setup`` (so the model-build
transient is part of the peak, as it is in a run), trains ``--steps`` steps of random tokens and reads VmHWM
from /proc/self/status. On CPU the device memory the plan predicts is this process memory; the workers run with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set as they leave a GPU's allocated
bytes (glibc otherwise keeps chunks up to 32 MB in its heap: the peak then grows over the steps with how the
heap fragments; the plan models that only roughly, ``heap_retains``). The prediction is
:func:`bigbatch.training.plan.plan_run`'s ``peak`` row for the same config, overrides and world size.
The tokenizer is not loaded (GPT-2's vocabulary, 50257 tokens, padded to 50304 rows, via model.vocab_size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: freed tensors go back to the system at once (glibc keeps chunks below its mmap threshold, up to 32 MB, in its
#: heap otherwise), so that resident memory follows the allocated tensors, as CUDA's max_memory_allocated does
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}

ENGINES = {
    "zero1": ["--train.engine", "deepspeed", "--deepspeed.config", "configs/deepspeed/zero1.json"],
    "zero2": ["--train.engine", "deepspeed", "--deepspeed.config", "configs/deepspeed/zero2.json"],
    "zero3": ["--train.engine", "deepspeed", "--deepspeed.config", "configs/deepspeed/zero3.json"],
    "fsdp2": ["--train.engine", "fsdp2", "--fsdp2.precision", "fp32"],
}


def overrides(engine: str, seq_len: int, micro: int, nproc: int, optimizer: str | None) -> list[str]:
    """The config overrides of one case: CPU float32, a batch of one micro batch per rank."""
    out = ["--data.seq_len", str(seq_len), "--model.vocab_size", "50304", "--deepspeed.precision", "fp32",
           "--batch.reference_global_batch", str(micro * nproc), "--batch.micro_batch_sizes", str(micro),
           *ENGINES[engine]]
    if optimizer:
        out += ["--optim.name", optimizer]
    return out


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in kB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def worker(args) -> None:
    import torch

    from bigbatch import distributed as bbdist
    from bigbatch.training.builders import setup
    from bigbatch.training.config import load_config

    info = bbdist.init_training_process(1)
    baseline = status_kb("VmRSS")
    reset_peak()
    cfg = load_config(args.config, args.overrides)
    vocab = type("Vocab", (), {"__len__": lambda self: 50257, "eos_token_id": 50256})()
    run = setup(cfg, info.world_size, vocab, cfg.data.seq_len)
    built_hwm, built_rss = status_kb("VmHWM"), status_kb("VmRSS")
    gen = torch.Generator().manual_seed(info.rank)
    plan = run.plan
    for _ in range(args.steps):
        batches = [torch.randint(0, 50257, (plan.micro_batch, cfg.data.seq_len), generator=gen)
                   for _ in range(plan.grad_accum)]
        run.engine.train_step(batches, info.device)
    row = {"rank": info.rank, "baseline_kb": baseline, "build_hwm_kb": built_hwm, "build_rss_kb": built_rss,
           "end_rss_kb": status_kb("VmRSS"), "hwm_kb": status_kb("VmHWM")}
    with open(os.path.join(args.result_dir, f"rank{info.rank}.json"), "w") as fh:
        json.dump(row, fh)
    bbdist.barrier()
    bbdist.destroy()


def run_case(config: str, engine: str, args) -> dict:
    """One torchrun of the worker (or its rows kept in ``--results`` by an earlier run, with ``--reuse``); the
    largest rank's peak above its baseline, and the prediction."""
    from bigbatch.training.config import load_config
    from bigbatch.training.plan import plan_run

    optimizer = args.optimizer or ("adabound" if "350m" in config else None)
    ov = overrides(engine, args.seq_len, args.micro, 2, optimizer)
    out = Path(args.results, f"{Path(config).stem}-{engine}")
    files = [out / f"rank{r}.json" for r in range(2)]
    if not (args.reuse and all(f.is_file() for f in files)):
        out.mkdir(parents=True, exist_ok=True)
        cmd = ["nice", "-n", "5", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", __file__, "--worker", "--config", config, "--result-dir", str(out), "--steps", str(args.steps),
               "--", *ov]
        env = {**os.environ, **MALLOC, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{config} {engine} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(f.read_text()) for f in files]
    os.environ.update(MALLOC)  # the prediction for the same allocator setting (no heap retention)
    cfg = load_config(config, ov)
    plan = plan_run(cfg, nodes=1, gpus_per_node=2, gpu=None, tokenizer_size=50257, with_cost=False)
    mem = plan.memory_for(plan.engine)
    worst = max(rows, key=lambda r: r["hwm_kb"] - r["baseline_kb"])
    measured = max((r["hwm_kb"] - r["baseline_kb"]) * 1024 for r in rows)
    build = max((r["build_hwm_kb"] - r["baseline_kb"]) * 1024 for r in rows)
    return {"config": config, "engine": engine, "predicted": mem.peak, "measured": measured,
            "ratio": mem.peak / measured, "measured_build": build, "predicted_build": mem.build,
            "predicted_rows": mem.rows(), "ranks": rows, "worst_rank": worst["rank"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["125m", "350m"])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--optimizer", help="optim.name instead of the config's (default: adamw for 125m; adabound, "
                                       "whose update allocates nothing, for 350m, to stay within this machine's memory)")
    p.add_argument("--results", default=os.path.join(tempfile.gettempdir(), "bigbatch_plan_memory"),
                   help="where each case's per-rank measurements are written")
    p.add_argument("--reuse", action="store_true", help="take a case's measurements from --results when there")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    args.overrides = [a for a in rest if a != "--"]
    if args.worker:
        worker(args)
        return 0
    results = []
    print("| config | engine | predicted MB | measured MB | predicted / measured | build: predicted / measured MB |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        for engine in args.engines:
            r = run_case(f"configs/{name}.yaml", engine, args)
            results.append(r)
            print(f"| {name} | {engine} | {r['predicted'] / 1e6:,.0f} | {r['measured'] / 1e6:,.0f} | {r['ratio']:.3f} | "
                  f"{r['predicted_build'] / 1e6:,.0f} / {r['measured_build'] / 1e6:,.0f} |", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in results)
    print(f"largest deviation: {worst:.1%} (goal: within 15%)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
