"""The GPU path in one run (one GPU, a few minutes): what can only be measured there.

1. equality: AdaBound/AMSBound/RAdam on CUDA (the compiled chunk kernels) against the CPU C kernel on
   a small case, 10 steps of the same gradients: the largest difference;
2. kernel launches per optimizer step, counted by the profiler, for a model-like list of tensors;
3. step time against torch.optim.Adam(fused=True) (one launch per group of tensors): fp32 and bf16
   parameters (bf16 with float32 moments), ~100M and ~1B parameters in Llama-like tensors;
4. train.py tokens/s in bf16 on a ~125M Llama for AdaBound against torch's fused AdamW.

    python benchmarks/gpu_check.py [--quick] [--skip-train]      (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_check.py --device cpu --quick          (the same code path on a CPU, tiny)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def llama_shapes(params: float, d: int) -> list[tuple[int, ...]]:
    """Tensor shapes of a Llama-like stack with ~``params`` parameters and width ``d``."""
    inter = (int(8 * d / 3) + 63) // 64 * 64
    layer = [(d, d)] * 4 + [(inter, d), (inter, d), (d, inter), (d,), (d,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    layers = max(1, round((params - 32000 * d) / per_layer))
    return [(32000, d)] + layer * layers + [(d,)]


def make(shapes, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for s in shapes:
        p = (torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        out.append(p)
    return out


def optimizers(dtype):
    from bigbatch.optim import AdaBound, AMSBound, RAdam

    state = {"state_dtype": torch.float32} if dtype != torch.float32 else {}
    return {
        "torch Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-4, fused=True),
        "bigbatch AdaBound": lambda ps: AdaBound(ps, lr=1e-4, **state),
        "bigbatch AMSBound": lambda ps: AMSBound(ps, lr=1e-4, **state),
        "bigbatch RAdam": lambda ps: RAdam(ps, lr=1e-4, **state),
    }


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def equality(device) -> None:
    from bigbatch.optim import AdaBound, AMSBound, RAdam

    print("1. equality with the CPU C kernel (10 steps, 3 tensors, fp32):")
    for cls in (AdaBound, AMSBound, RAdam):
        shapes = [(257, 33), (1000,), (64, 64)]
        cpu, dev = make(shapes, "cpu", torch.float32), make(shapes, device, torch.float32)
        o_cpu, o_dev = cls(cpu, lr=1e-2), cls(dev, lr=1e-2)
        gen = torch.Generator().manual_seed(5)
        for _ in range(10):
            for a, b in zip(cpu, dev):
                g = torch.randn(a.shape, generator=gen)
                a.grad, b.grad = g, g.to(device)
            o_cpu.step()
            o_dev.step()
        diff = max(float((a - b.cpu()).abs().max()) for a, b in zip(cpu, dev))
        print(f"   {cls.__name__:<9} max |cuda - cpu| = {diff:.3g}")


def launches(device, shapes) -> None:
    from torch.profiler import ProfilerActivity, profile

    print(f"2. kernel launches per step ({len(shapes)} tensors, fp32):")
    for name, mk in optimizers(torch.float32).items():
        ps = make(shapes, device, torch.float32)
        opt = mk(ps)
        for _ in range(3):
            opt.step()
        sync(device)
        acts = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof:
            opt.step()
            sync(device)
        if device == "cuda":
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            print(f"   {name:<18} {len(kernels):5d} kernels")
        else:
            print(f"   {name:<18} (CPU: {len(prof.events())} profiler events; count kernels on a GPU)")


def step_times(device, params_list, steps) -> None:
    print(f"3. step time, median of {steps} steps (ratio to torch Adam fused in the same run):")
    for params in params_list:
        shapes = llama_shapes(params, 768 if params < 3e8 else 2048)
        n = sum(torch.Size(s).numel() for s in shapes)
        for dtype in (torch.float32, torch.bfloat16):
            times = {}
            for name, mk in optimizers(dtype).items():
                ps = make(shapes, device, dtype)
                opt = mk(ps)
                for _ in range(3):  # compile, first allocations
                    opt.step()
                sync(device)
                ts = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    opt.step()
                    sync(device)
                    ts.append(time.perf_counter() - t0)
                times[name] = statistics.median(ts) * 1e3
                del opt, ps
                if device == "cuda":
                    torch.cuda.empty_cache()
            ref = times["torch Adam fused"]
            row = ", ".join(f"{k.split()[-1]} {v:.2f} ms ({v / ref:.2f}x)" for k, v in times.items())
            print(f"   {n / 1e6:6.0f}M params, {len(shapes)} tensors, {str(dtype)[6:]:<8}: {row}")


def train_throughput(steps: int) -> None:
    print(f"4. train.py tokens/s, bf16, ~125M Llama (configs/125m.yaml shapes), {steps} steps, embedded text:")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    base = ["--config", "configs/125m.yaml", "--data.source", "embedded", "--tokenizer.kind", "bpe",
            "--tokenizer.vocab_size", "32000", "--data.seq_len", "1024", "--data.num_proc", "1",
            "--batch.global_batch", "32", "--batch.micro_batch_sizes", "[16, 8]", "--train.max_steps", str(steps),
            "--train.eval_every", "0", "--train.log_every", "5", "--checkpoint.at_end", "false",
            "--deepspeed.config", "null", "--deepspeed.zero_stage", "1", "--deepspeed.precision", "bf16",
            "--logging.progress", "none", "--logging.plot", "false", "--logging.tensorboard", "false",
            "--overwrite"]
    runs = {"AdaBound": [], "AdamW (torch fused)": ["--optim.name", "adamw", "--optim.kwargs", "{fused: true}"]}
    rates = {}
    for name, extra in runs.items():
        out = f"/tmp/bigbatch-gpu-check-{name.split()[0].lower()}"
        proc = subprocess.run([sys.executable, "train.py", *base, "--out", out, *extra], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"   {name}: train.py failed ({proc.returncode}): {proc.stderr[-1500:]}")
            continue
        recs = [json.loads(line) for line in open(f"{out}/metrics.jsonl") if '"train"' in line]
        rates[name] = statistics.median(r["tokens_per_s"] for r in recs[2:] if r.get("tokens_per_s"))
        print(f"   {name:<20} {rates[name]:12,.0f} tokens/s")
    if len(rates) == 2:
        print(f"   ratio AdaBound / AdamW: {rates['AdaBound'] / rates['AdamW (torch fused)']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a dry run of the code path)")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here")
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}")
    equality(args.device)
    launches(args.device, llama_shapes(2e6 if args.quick else 1e8, 128 if args.quick else 768))
    step_times(args.device, [2e6] if args.quick else [1e8, 1e9], 3 if args.quick else 20)
    if not args.skip_train:
        train_throughput(10 if args.quick else 60)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
