"""Data preparation and prepared-data training, against references measured in the same run.

1. Throughput: ``bigbatch prepare-data`` (bigbatch.data.prepare) on JSONL files, tokens/s per worker
   at 1 and 2 workers, against the same tokenizer's ``encode_batch`` on the same text (read into
   memory first; one thread, like one worker). Raw encode is timed before and after the 1-worker
   prepare and averaged, so load from other processes hits both sides alike.
2. Peak RSS of prepare at two corpus sizes 10x apart (the same ``data.shard_bytes``).
3. train.py (configs/tiny.yaml, one process) on synthetic prepared sets of ``--tokens`` and a tenth of
   it: seconds from the end of its imports to its first logged step, its peak RSS, and the loader's
   time per step (GlobalBatchLoader.next_step on the same set) as a share of the step time.

The synthetic set (uint16, 2 bytes/token: 2 GB for 1B tokens) and everything else lives in a
temporary directory that is deleted at the end.

    python benchmarks/data_prep.py [--mb 3] [--tokens 1000000000] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

PREPARE_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from bigbatch.data.prepare import PREPARE_SECTIONS, run_prepare
from bigbatch.training.config import load_config
cfg = load_config({cfg!r}, sections=PREPARE_SECTIONS)
t = time.perf_counter()
res = run_prepare(cfg, {out!r}, workers={workers}, log=lambda m: None)
dt = time.perf_counter() - t
print(json.dumps({{"seconds": dt, "phase_seconds": res.seconds,
                  "rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""

DATATROVE_CHILD = """
import json, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
ex = LocalPipelineExecutor(pipeline=[
    JsonlReader({data!r}, glob_pattern="*.jsonl", add_file_path=False),
    DocumentTokenizer({out!r}, tokenizer_name_or_path={tok!r}, eos_token={eos!r}, shuffle_documents=False,
                      batch_size=1024)], tasks=1, workers=1, logging_dir={logs!r})
t = time.perf_counter()
ex.run()
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""

TRAIN_CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
import train
print("IMPORTED", time.time(), flush=True)
sys.exit(train.main({argv!r}))
"""


def write_corpus(dirpath: Path, mb: float, docs: list[str]) -> list[Path]:
    """JSONL files of about ``mb`` MB in total (1 MB each), cycling through ``docs``."""
    dirpath.mkdir(parents=True)
    files, i, k = [], 0, 0
    target = int(mb * 1e6)
    written = 0
    while written < target:
        path = dirpath / f"part{k:04d}.jsonl"
        size = 0
        with open(path, "w") as fh:
            while size < 1_000_000 and written + size < target:
                line = json.dumps({"text": docs[i % len(docs)]}) + "\n"
                fh.write(line)
                size += len(line)
                i += 1
        files.append(path)
        written += size
        k += 1
    return files


def raw_encode(tokenizer_json: str, texts: list[str]) -> tuple[int, float]:
    """(tokens, seconds) of encode_batch over ``texts`` in batches of 1024, one thread."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    n, t = 0, time.perf_counter()
    for i in range(0, len(texts), 1024):
        for enc in tok.encode_batch(texts[i:i + 1024], add_special_tokens=False):
            n += len(enc.ids) + 1
    return n, time.perf_counter() - t


def run_child(code: str) -> tuple[dict, float]:
    """(last JSON line printed, peak RSS in MB) of ``python -c code``."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO)
    out = proc.stdout.read().decode()
    _pid, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"child failed ({status}):\n{out}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def prepare(tmp: Path, name: str, files_glob: str, tok_dir: str, workers: int, shard_bytes: int) -> dict:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "tokenizer": {"kind": "pretrained", "path": tok_dir},
        "data": {"shard_bytes": shard_bytes, "sources": [{"name": "web", "kind": "json", "files": [files_glob]}]}}))
    out = tmp / name
    res, rss = run_child(PREPARE_CHILD.format(repo=str(REPO), cfg=str(cfg), out=str(out), workers=workers))
    man = json.loads((out / "web" / "manifest.json").read_text())
    res.update(tokens=man["tokens"], tokens_per_s=man["tokens"] / res["phase_seconds"],
               end_to_end_per_s=man["tokens"] / res["seconds"], rss_mb=rss)
    shutil.rmtree(out)
    return res


def datatrove(tmp: Path, data: Path, tok_json: str, eos: str, tokens: int) -> dict | None:
    """datatrove's JsonlReader + DocumentTokenizer on the same files, one task, one worker (None when
    datatrove is not installed)."""
    try:
        import datatrove  # noqa: F401
    except ImportError:
        return None
    out = tmp / "datatrove"
    res, rss = run_child(DATATROVE_CHILD.format(data=str(data), out=str(out), tok=tok_json, eos=eos,
                                                logs=str(tmp / "datatrove-logs")))
    shutil.rmtree(out, ignore_errors=True)
    return {**res, "tokens_per_s": tokens / res["seconds"], "rss_mb": rss}


def synthetic_set(out: Path, tok_dir: str, tokens: int, vocab: int, eos: int, shard_tokens: int = 100_000_000) -> None:
    """A prepared directory of ``tokens`` random ids (documents of 1000 tokens) in 100M-token shards."""
    from transformers import AutoTokenizer

    from bigbatch.data import shards
    from bigbatch.data.tokenizer import _finish

    out.mkdir(parents=True)
    shutil.copytree(tok_dir, out / "tokenizer")
    src = out / "synthetic"
    src.mkdir()
    rng = np.random.default_rng(0)
    recs, left, i = [], tokens, 0
    while left > 0:
        n = min(shard_tokens, left)
        ids = rng.integers(0, vocab, size=n, dtype=np.uint16)
        ids[999::1000] = eos
        ends = np.arange(1000, n + 1, 1000, dtype=np.int64)
        if n % 1000:
            ends = np.append(ends, n)
        recs.append(shards.write_shard(str(src), i, ids, ends))
        del ids
        left -= n
        i += 1
    fp = _finish(AutoTokenizer.from_pretrained(tok_dir)).fingerprint
    man = {"format": shards.FORMAT, "version": shards.VERSION, "source": "synthetic", "kind": "synthetic",
           "inputs": [], "weight": 1.0, "dtype": "uint16", "vocab_size": vocab, "eos_id": eos, "tokenizer": fp,
           "tokenizer_dir": "../tokenizer", "tokens": tokens, "docs": sum(r["docs"] for r in recs), "shards": recs}
    (src / shards.MANIFEST).write_text(json.dumps(man, indent=1, sort_keys=True))


def train_run(tmp: Path, name: str, prepared: Path | None, steps: int) -> dict:
    """train.py on ``prepared``, or (None) on the in-job path's cached embedded corpus (the reference)."""
    out = tmp / f"run-{name}"
    data = (["--data.source", "prepared", "--data.prepared", f"[{{path: {prepared}}}]", "--data.val_fraction", "0.0001"]
            if prepared is not None else ["--data.cache_dir", str(tmp / "cache"), "--data.max_chars", "1000000"])
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--out", str(out), *data,
            "--train.max_steps", str(steps), "--train.log_every", "1", "--train.eval_every", "0",
            "--train.eval_blocks", "16", "--checkpoint.at_end", "false", "--logging.progress", "none",
            "--logging.tensorboard", "false", "--logging.plot", "false", "--train.threads", "1"]
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD.format(repo=str(REPO), argv=argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    text = proc.stdout.read().decode()
    _pid, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"train.py failed ({status}):\n{text[-3000:]}")
    imported = float(next(line.split()[1] for line in text.splitlines() if line.startswith("IMPORTED")))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in recs if r["kind"] == "train"]
    step_s = float(np.median(np.diff(times[2:]))) if len(times) > 3 else float("nan")  # steady state
    shutil.rmtree(out)
    return {"first_step_s": times[0] - imported, "step_s": step_s, "rss_mb": usage.ru_maxrss / 1024}


def loader_time(prepared: Path, steps: int = 300) -> float:
    """Seconds per GlobalBatchLoader.next_step at the tiny config's batch (16 x 128 tokens, one process)."""
    from bigbatch.data.mixture import open_prepared
    from bigbatch.training.config import load_config
    from bigbatch.data.blocks import GlobalBatchLoader

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["--data.source", "prepared", "--data.val_fraction", "0.0001",
                                                       "--data.prepared", f"[{{path: {prepared}}}]"])
    _tok, data = open_prepared(cfg, check_hashes=False)
    loader = GlobalBatchLoader(data.train, micro_batch=16, grad_accum=1, rank=0, world_size=1, seed=1)
    loader.next_step()
    t = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    return (time.perf_counter() - t) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=3.0, help="small corpus in MB (the large one is 10x)")
    p.add_argument("--tokens", type=int, default=1_000_000_000, help="synthetic prepared set for train.py")
    p.add_argument("--steps", type=int, default=30, help="train.py steps per run")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()

    from bigbatch.data.corpus import embedded_documents
    from bigbatch.data.tokenizer import train_bpe

    tmp = Path(tempfile.mkdtemp(prefix="bigbatch-dataprep-"))
    try:
        docs = embedded_documents("stdlib")
        # Both corpora start with the largest document: a worker's peak memory follows the largest
        # documents of one encode batch, which the RSS comparison must hold equal to see the corpus size.
        big = max(range(len(docs)), key=lambda i: len(docs[i]))
        docs = docs[big:] + docs[:big]
        small = write_corpus(tmp / "small", args.mb, docs)
        large = write_corpus(tmp / "large", 10 * args.mb, docs)
        tok_dir = str(tmp / "tok")
        tok = train_bpe(docs[:2000], 2048, tok_dir)
        shard_bytes = 1_000_000
        print(f"corpora: {len(small)} / {len(large)} JSONL files of 1 MB; BPE 2048; shard_bytes {shard_bytes}")

        texts = [json.loads(line)["text"] for f in large for line in open(f)]
        n_raw, t_raw1 = raw_encode(os.path.join(tok_dir, "tokenizer.json"), texts)
        p1 = prepare(tmp, "p1", str(tmp / "large" / "*.jsonl"), tok_dir, 1, shard_bytes)
        _, t_raw2 = raw_encode(os.path.join(tok_dir, "tokenizer.json"), texts)
        p2 = prepare(tmp, "p2", str(tmp / "large" / "*.jsonl"), tok_dir, 2, shard_bytes)
        del texts
        raw = n_raw / ((t_raw1 + t_raw2) / 2)
        dt = datatrove(tmp, tmp / "large", os.path.join(tok_dir, "tokenizer.json"), tok.eos_token, n_raw)
        assert p1["tokens"] == n_raw == p2["tokens"], (p1["tokens"], n_raw, p2["tokens"])
        print(f"\n1. throughput on {10 * args.mb:g} MB JSONL ({n_raw:,} tokens)")
        print(f"   raw encode_batch, one thread     {raw / 1e6:8.3f} M tokens/s  (runs: {n_raw / t_raw1 / 1e6:.3f}, "
              f"{n_raw / t_raw2 / 1e6:.3f})")
        for label, r in (("1 worker ", p1), ("2 workers", p2)):
            print(f"   prepare-data, {label}          {r['tokens_per_s'] / 1e6:8.3f} M tokens/s "
                  f"= {r['tokens_per_s'] / raw:.2f}x raw  (read+tokenize+write+hash phase; whole call incl. "
                  f"tokenizer load and planning: {r['end_to_end_per_s'] / 1e6:.3f} M/s = "
                  f"{r['end_to_end_per_s'] / raw:.2f}x)")
        if dt is not None:
            print(f"   datatrove tokenizer, 1 worker    {dt['tokens_per_s'] / 1e6:8.3f} M tokens/s = "
                  f"{dt['tokens_per_s'] / raw:.2f}x raw (JsonlReader + DocumentTokenizer, executor run; peak RSS "
                  f"{dt['rss_mb']:.0f} MB)")
        print(f"   per worker: 1 worker {p1['tokens_per_s'] / raw:.2f}x raw; "
              f"2 workers {p2['tokens_per_s'] / 2 / raw:.2f}x "
              f"raw each, {p2['tokens_per_s'] / p1['tokens_per_s']:.2f}x one worker")

        ps = prepare(tmp, "ps", str(tmp / "small" / "*.jsonl"), tok_dir, 1, shard_bytes)
        ps2 = prepare(tmp, "ps2", str(tmp / "small" / "*.jsonl"), tok_dir, 2, shard_bytes)
        print(f"\n2. peak RSS of prepare (MB), {args.mb:g} MB vs {10 * args.mb:g} MB of JSONL")
        print(f"   1 worker (in process)            {ps['rss_mb']:8.1f} vs {p1['rss_mb']:8.1f}  "
              f"({p1['rss_mb'] / ps['rss_mb']:.3f}x)")
        print(f"   2 workers: main / largest worker {ps2['rss_self_mb']:6.1f}/{ps2['rss_workers_mb']:6.1f} vs "
              f"{p2['rss_self_mb']:6.1f}/{p2['rss_workers_mb']:6.1f}  "
              f"({p2['rss_workers_mb'] / ps2['rss_workers_mb']:.3f}x)")

        if not args.skip_train:
            big, tenth = tmp / "synthetic-big", tmp / "synthetic-tenth"
            t = time.perf_counter()
            synthetic_set(big, tok_dir, args.tokens, 2048, tok.eos_token_id)
            synthetic_set(tenth, tok_dir, args.tokens // 10, 2048, tok.eos_token_id)
            print(f"\n3. train.py on synthetic prepared sets ({time.perf_counter() - t:.0f} s to write them)")
            train_run(tmp, "warm", None, 3)  # tokenizes the reference corpus into its cache
            ref = train_run(tmp, "ref", None, args.steps)
            rb = train_run(tmp, "big", big / "synthetic", args.steps)
            rt = train_run(tmp, "tenth", tenth / "synthetic", args.steps)
            data_s = loader_time(big / "synthetic")
            print(f"   imports -> first step, {args.tokens:,} tokens   {rb['first_step_s']:6.2f} s "
                  f"({args.tokens // 10:,} tokens: {rt['first_step_s']:.2f} s; in-job path, cached 1M-char corpus: "
                  f"{ref['first_step_s']:.2f} s; the prepared set adds "
                  f"{rb['first_step_s'] - ref['first_step_s']:.2f} s)")
            print(f"   peak RSS of train.py (MB)         {rt['rss_mb']:8.1f} vs {rb['rss_mb']:8.1f}  "
                  f"({rb['rss_mb'] / rt['rss_mb']:.3f}x for 10x the tokens)")
            print(f"   data loading per step            {data_s * 1e3:8.3f} ms of {rb['step_s'] * 1e3:.1f} ms/step "
                  f"= {100 * data_s / rb['step_s']:.2f}% of the step (tiny config, 1 process)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n(every ratio compares measurements of this run; a machine loaded by other jobs lowers the "
          "2-worker ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
