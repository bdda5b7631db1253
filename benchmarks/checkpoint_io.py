"""What content hashes cost a checkpoint save and load: a real DeepSpeed engine (one process, ZeRO-1,
AdaBound) whose tag is about ``--gb`` GB, saved ``--repeats`` times with ``bigbatch.sharding``.

Printed: the tag's size, the median save time, the time the hashing takes inside it (the same files
hashed again, from the page cache as right after the save), the time verifying a tag takes before a
load (sizes + hashes), and hashing's share of a save. The reference is the save itself, measured in
the same run.

    python benchmarks/checkpoint_io.py [--gb 1.0] [--repeats 3] [--dir /tmp/bigbatch-ckpt-io]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="about this many GB per tag")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="/tmp/bigbatch-ckpt-io")
    args = p.parse_args()

    import torch

    from bigbatch.sharding import build_engine, save_checkpoint, tags

    # a tag holds ~28 bytes per parameter (DeepSpeed: weights, fp32 master, 2 moments; bigbatch's
    # resharding part: fp32 weights and 2 moments)
    params = int(args.gb * 1e9 / 28)
    width = 2048
    layers = max(1, round(params / (width * width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
          "optimizer": {"type": "AdaBound", "params": {"lr": 1e-3}}, "steps_per_print": 10**9}
    engine, _, _ = build_engine(model, ds)
    x = torch.randn(2, width)
    engine.backward(engine(x).square().mean())
    engine.step()
    ckpt = os.path.join(args.dir, "checkpoints")
    shutil.rmtree(args.dir, ignore_errors=True)
    saves, hashes, verifies = [], [], []
    for i in range(args.repeats):
        tag = f"t{i}"
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
    size = tags.tag_bytes(ckpt, f"t{args.repeats - 1}")
    save, hashing, verify = (statistics.median(v) for v in (saves, hashes, verifies))
    print(f"model {layers} x {width}x{width} = {layers * width * width / 1e6:.0f}M params; tag {size / 1e9:.2f} GB "
          f"in {len(files)} files ({args.repeats} saves, medians)")
    print(f"save {save:.2f} s ({size / save / 1e9:.2f} GB/s) | hashing inside it {hashing:.3f} s "
          f"({size / hashing / 1e9:.1f} GB/s) = {100 * hashing / save:.1f}% of the save | verify before a load "
          f"{verify:.3f} s")
    shutil.rmtree(args.dir, ignore_errors=True)
    engine.destroy()


if __name__ == "__main__":
    main()
