"""What a checkpoint costs on disk and in training time, both engines, one process, AMSBound (weights,
two moments and ``max_exp_avg_sq`` per parameter): a stack of ``--layers`` Linear layers of
``--width`` (``--mparams`` million parameters in all).

Printed, each against a reference measured in the same run:

* bytes per parameter of a tag against the state it holds (weights, fp32 master weights when the
  weights are bf16, the moments, AMSBound's max): DeepSpeed ZeRO-``--stage`` (bigbatch's by-name parts only)
  next to what DeepSpeed's own files, written as well before, added (measured: DeepSpeed's
  ``save_checkpoint`` on the same engine); FSDP2 (torch.distributed.checkpoint);
* the time the training loop is stalled per FSDP2 save: a synchronous save, and a background save
  (``checkpoint.async_save``: the state copied to memory, then written, hashed and made ``latest``
  in background threads), with the time the background save takes to complete;
* content hashes: the hashing's share of a DeepSpeed save, and the verification before a load.

    python benchmarks/checkpoint_io.py [--mparams 25] [--repeats 3] [--precision fp32|bf16] [--stage 2]
                                       [--dir /tmp/...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def model(width: int, layers: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def deepspeed_part(args, width, layers, ckpt) -> dict:
    import torch

    from bigbatch.sharding import build_engine, save_checkpoint, tags

    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": args.stage},
          "optimizer": {"type": "AMSBound", "params": {"lr": 1e-3}}, "steps_per_print": 10**9,
          "bf16": {"enabled": args.precision == "bf16"}}
    engine, _, _ = build_engine(model(width, layers), ds)
    x = torch.randn(2, width, dtype=next(engine.module.parameters()).dtype)
    engine.backward(engine(x).float().square().mean())
    engine.step()
    saves, hashes, verifies = [], [], []
    for i in range(args.repeats):
        tag = f"ds{i}"
        t0 = time.perf_counter()
        save_checkpoint(engine, ckpt, tag=tag, keep=1)
        saves.append(time.perf_counter() - t0)
        path = os.path.join(ckpt, tag)
        files = tags.tag_files(path)
        t0 = time.perf_counter()
        for f in files:
            tags.file_hash(os.path.join(path, f))
        hashes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tags.verify_tag(ckpt, tag)
        verifies.append(time.perf_counter() - t0)
    size = tags.tag_bytes(ckpt, f"ds{args.repeats - 1}")
    native = os.path.join(args.dir, "deepspeed_native")
    engine.save_checkpoint(native, tag="native", save_latest=False)  # what DeepSpeed's own files add
    native_bytes = dir_bytes(native)
    engine.destroy()
    return {"bytes": size, "native_bytes": native_bytes, "save": statistics.median(saves),
            "hash": statistics.median(hashes), "verify": statistics.median(verifies)}


def fsdp2_part(args, width, layers, ckpt) -> dict:
    import torch
    import torch.distributed as dist

    from bigbatch.optim import AMSBound
    from bigbatch.sharding import tags
    from bigbatch.sharding.fsdp2_checkpoint import ReusedBufferStager, save_checkpoint
    from bigbatch.sharding.fsdp2_engine import shard_model

    m = shard_model(model(width, layers))
    opt = AMSBound(m.parameters(), lr=1e-3)
    m(torch.randn(2, width)).square().mean().backward()
    opt.step()
    group, stager = dist.new_group(backend="gloo"), ReusedBufferStager()
    sync, stall, complete = [], [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        save_checkpoint(m, opt, ckpt, tag=f"f{i}s", client_state={"samples": 2 * i}, keep=1)
        sync.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pending = save_checkpoint(m, opt, ckpt, tag=f"f{i}a", client_state={"samples": 2 * i + 1}, keep=1,
                                  background=True, group=group, stager=stager)
        stall.append(time.perf_counter() - t0)
        pending.wait()
        complete.append(time.perf_counter() - t0)
    size = tags.tag_bytes(ckpt, f"f{args.repeats - 1}a")
    return {"bytes": size, "sync": statistics.median(sync), "stall": statistics.median(stall),
            "complete": statistics.median(complete)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mparams", type=float, default=25.0, help="million parameters")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="DeepSpeed's weights")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=2, help="DeepSpeed's ZeRO stage")
    p.add_argument("--dir", default="/tmp/bigbatch-ckpt-io")
    args = p.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    from bigbatch.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed(use_deepspeed=True)
    width = args.width
    layers = max(1, round(args.mparams * 1e6 / (width * width)))
    n = layers * width * width
    shutil.rmtree(args.dir, ignore_errors=True)
    ds = deepspeed_part(args, width, layers, os.path.join(args.dir, "deepspeed"))
    fs = fsdp2_part(args, width, layers, os.path.join(args.dir, "fsdp2"))
    shutil.rmtree(args.dir, ignore_errors=True)

    lp = 2 if args.precision == "bf16" else 4
    ds_state = lp + (4 if lp != 4 else 0) + 3 * 4  # weights, fp32 master, exp_avg, exp_avg_sq, max_exp_avg_sq
    fs_state = 4 + 3 * 4
    print(f"model {layers} x {width}x{width} = {n / 1e6:.1f}M params, AMSBound ({args.repeats} saves, medians)")
    before = ds["bytes"] + ds["native_bytes"]
    print(f"DeepSpeed ZeRO-{args.stage} {args.precision}: state {ds_state} B/param | tag {ds['bytes'] / n:.2f} "
          f"B/param = {ds['bytes'] / n / ds_state:.3f}x the state | with DeepSpeed's own files as before "
          f"{before / n:.2f} B/param = {before / n / ds_state:.3f}x")
    print(f"FSDP2 fp32: state {fs_state} B/param | tag {fs['bytes'] / n:.2f} B/param = "
          f"{fs['bytes'] / n / fs_state:.3f}x the state")
    print(f"FSDP2 save: synchronous {fs['sync']:.3f} s | background: loop stalled {fs['stall']:.3f} s = "
          f"{100 * fs['stall'] / fs['sync']:.1f}% of the synchronous save (complete after {fs['complete']:.3f} s)")
    print(f"DeepSpeed save {ds['save']:.2f} s ({ds['bytes'] / ds['save'] / 1e9:.2f} GB/s) | hashing inside it "
          f"{ds['hash']:.3f} s = {100 * ds['hash'] / ds['save']:.1f}% of the save | verify before a load "
          f"{ds['verify']:.3f} s")


if __name__ == "__main__":
    main()
