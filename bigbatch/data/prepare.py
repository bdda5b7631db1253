"""``bigbatch prepare-data``: tokenize the sources of a config once, in parallel, into token shards.

    bigbatch prepare-data --config data.yaml --out /data/prep --workers 8
    bigbatch submit --nodes 1 --sbatch-arg=--array=0-15 -- -m bigbatch.cli prepare-data \
        --config data.yaml --out /data/prep --workers 8        # a SLURM array: task k does pieces k, k+16, ...

Writes ``OUT/tokenizer/`` (the tokenizer, saved once), ``OUT/<source>/`` per source (shards and
manifest: bigbatch.data.shards), ``OUT/plan.json`` (inputs and settings; a restart or another array
task with other ones is refused) and ``OUT/manifest.json`` (every source, its weight and tokens).

Each piece of input (bigbatch.data.sources) becomes one shard, written whole by one worker process
(``encode_batch`` of the ``tokenizers`` library on one thread per worker). A killed prepare started
again skips finished shards; the last array task to finish writes the manifests. Shards depend only
on the inputs, the tokenizer and ``data.shard_bytes``, never on the number of workers or tasks, so
the result is byte-identical however it was run. A prepare that stops on an error leaves
``OUT/failed.txt``: a rerun with other inputs (the bad line fixed) then starts over instead of being
refused. SIGTERM and SIGINT stop the workers with the parent (exit 128+signal); a worker also dies
when its parent is killed outright.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from bigbatch import atomic
from bigbatch.data import shards
from bigbatch.data.entries import FILE_KINDS, SourceSpec, source_specs
from bigbatch.data.encode import encode_piece, init_worker
from bigbatch.data.sources import Piece, plan_pieces, resolve_files, source_documents
from bigbatch.cli_parser import command_main
from bigbatch.errors import ConfigError
from bigbatch.data.corpus import Corpus, embedded_documents, hash_files, load_corpus
from bigbatch.data.tokenizer import _finish, build_tokenizer

PLAN = "plan.json"
FAILED = "failed.txt"  # beside the plan of a prepare that stopped on an error: another plan may replace it
PREPARE_SECTIONS = ("tokenizer", "data")  # all a prepare reads of a config


def source_manifest(name: str, kind: str, inputs: list[str], weight: float, tok, dtype: np.dtype,
                    records: list[dict], tokenizer_dir: str | None) -> dict:
    """The manifest of one prepared source (bigbatch.data.shards) from its shards' records."""
    return {"format": shards.FORMAT, "version": shards.VERSION, "source": name, "kind": kind, "inputs": inputs,
            "weight": weight, "dtype": dtype.name, "vocab_size": len(tok), "eos_id": int(tok.eos_token_id),
            "tokenizer": tok.fingerprint, "tokenizer_dir": tokenizer_dir,
            "tokens": sum(r["tokens"] for r in records), "docs": sum(r["docs"] for r in records), "shards": records}


def build_prepare_tokenizer(cfg, specs: list[SourceSpec], files: list[str]):
    """The run's tokenizer as train.py would build it: ``pretrained`` loaded, ``bpe`` trained on the
    first source (for a config with a single ``data.source``, the same cached BPE as the in-job path).
    A file source is read by the workers' own reader (``files``: its resolved files), so bad content
    is refused with one line naming file and byte before anything is written."""
    corpus = None
    if cfg.tokenizer.kind == "bpe":
        spec = specs[0]
        if spec.kind in FILE_KINDS:
            fingerprint = f"{spec.kind}-{hash_files(files)}" + (f"-max{spec.max_chars}" if spec.max_chars else "")
            corpus = Corpus(None, fingerprint, f"{spec.kind} files ({len(files)})",
                            documents=lambda: source_documents(spec, files, cfg.data.shard_bytes, spec.max_chars))
        else:
            corpus = load_corpus(cfg.data if not cfg.data.sources else spec.data_config(cfg.data))
    return build_tokenizer(cfg.tokenizer, corpus, cfg.data.cache_dir)


def check_out(out: str) -> None:
    """Refuse an ``--out`` that names a file or lies under one (before any work)."""
    path = os.path.abspath(out)
    while True:
        if os.path.exists(path):
            if not os.path.isdir(path):
                what = "is a file" if path == os.path.abspath(out) else f"lies under the file {path!r}"
                raise ConfigError(f"--out: {out!r} {what}; give a directory (new, or one prepare-data wrote)")
            return
        path = os.path.dirname(path)


def save_tokenizer(tok, out: str) -> str:
    """``OUT/tokenizer`` holding ``tok``; an existing one with another fingerprint is refused."""
    from transformers import AutoTokenizer

    path = os.path.join(out, shards.TOKENIZER_DIR)
    if os.path.isdir(path):
        have = _finish(AutoTokenizer.from_pretrained(path)).fingerprint
        if have != tok.fingerprint:
            raise ConfigError(f"--out: {out!r} holds data prepared with tokenizer {have}, this config's is "
                              f"{tok.fingerprint}; give another --out")
        return path
    tmp = path + atomic.TMP_MARK + str(os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another array task saved the same tokenizer first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check_plan(out: str, plan: dict) -> None:
    """Refuse an ``out`` that holds a prepare of another plan, unless that one failed before it
    finished (``FAILED`` beside its plan, no manifest): what it wrote is removed."""
    path = os.path.join(out, PLAN)
    text = json.dumps(plan, indent=1, sort_keys=True)
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        old = fh.read()
    if old == text:
        return
    failed = os.path.isfile(os.path.join(out, FAILED)) and not os.path.isfile(os.path.join(out, shards.MANIFEST))
    if not failed:
        raise ConfigError(f"--out: {out!r} holds a prepare of other inputs or settings ({path} differs); "
                          "give another --out or delete it")
    _remove_attempt(out, json.loads(old))


def _remove_attempt(out: str, plan: dict) -> None:
    """Remove what the failed prepare of ``plan`` wrote in ``out`` (its shards, tokenizer and plan)."""
    for src in plan.get("sources", []):
        d = os.path.join(out, str(src.get("name", "")))
        if src.get("name") and os.path.isdir(d):
            for f in os.listdir(d):
                if f.startswith("shard-") or atomic.TMP_MARK in f:
                    os.remove(os.path.join(d, f))
            if not os.listdir(d):
                os.rmdir(d)
    shutil.rmtree(os.path.join(out, shards.TOKENIZER_DIR), ignore_errors=True)
    for name in (PLAN, FAILED):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def _remove_stale_temporaries(out: str, names: list[str]) -> None:
    for name in names:
        d = os.path.join(out, name)
        for f in os.listdir(d):
            if atomic.TMP_MARK in f:
                os.remove(os.path.join(d, f))


def _finalize(out: str, specs: list[SourceSpec], pieces: dict[int, list[Piece]], tok, dtype: np.dtype,
              inputs: dict[int, list[str]]) -> bool:
    """Write every source's manifest and OUT/manifest.json once all shards exist; False if some are missing."""
    records = {}
    for si, spec in enumerate(specs):
        d = os.path.join(out, spec.name)
        recs = [shards.shard_record(d, p.index) for p in pieces[si]]
        if any(r is None for r in recs):
            return False
        if not sum(r["tokens"] for r in recs):
            files = ", ".join(inputs[si][:3]) + (", ..." if len(inputs[si]) > 3 else "")
            raise ConfigError(f"data.sources: source {spec.name!r} ({files}) holds no documents (0 tokens); give it "
                              "files with text or leave it out")
        records[si] = recs
    root = {"format": shards.FORMAT, "version": shards.VERSION, "tokenizer": tok.fingerprint, "sources": {}}
    for si, spec in enumerate(specs):
        man = source_manifest(spec.name, spec.kind, inputs[si], spec.weight, tok, dtype, records[si],
                              os.path.join("..", shards.TOKENIZER_DIR))
        atomic.write_text(os.path.join(out, spec.name, shards.MANIFEST), json.dumps(man, indent=1, sort_keys=True))
        root["sources"][spec.name] = {"path": spec.name, "weight": spec.weight, "tokens": man["tokens"]}
    atomic.write_text(os.path.join(out, shards.MANIFEST), json.dumps(root, indent=1, sort_keys=True))
    return True


def _stream_hub(spec: SourceSpec, si: int, shard_bytes: int):
    """(piece, docs) of a hub dataset read as a stream (needs a network), cut by characters."""
    import datasets

    try:
        stream = datasets.load_dataset(spec.dataset, spec.subset, split=spec.split, streaming=True)
    except Exception as exc:  # offline, unknown name, ...
        raise ConfigError(f"data.sources: cannot stream hub dataset {spec.dataset!r}: {exc}") from None
    docs, size, index, total = [], 0, 0, 0
    for row in stream:
        text = row.get(spec.text_field) or ""
        if spec.max_chars is not None:
            text = text[: max(0, spec.max_chars - total)]
        docs.append(text)
        size += len(text)
        total += len(text)
        if size >= shard_bytes:
            yield Piece(si, index, None, 0, len(docs)), docs
            docs, size, index = [], 0, index + 1
        if spec.max_chars is not None and total >= spec.max_chars:
            break
    if docs or index == 0:
        yield Piece(si, index, None, 0, len(docs)), docs


@dataclass
class PrepareResult:
    """``finished``: the manifests were written (every piece of every task is done); ``shards`` and
    ``tokens`` this task wrote; ``seconds``: wall time of its tokenize-and-write phase (starting the
    workers included; building the tokenizer and planning not)."""

    finished: bool
    shards: int
    tokens: int
    seconds: float


class Progress:
    """Shards done of ``total``, input MB/s and tokens: a tqdm bar on a terminal, else a plain line
    through ``log`` at most every ``every_s`` seconds (and at the last shard)."""

    def __init__(self, total: int, log, every_s: float, bar: bool):
        self.total, self.log, self.every_s = total, log, every_s
        self.done, self.bytes, self.tokens = 0, 0, 0
        self.started = self.last = time.perf_counter()
        self.bar = None
        if bar and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="shard", desc="prepare-data", file=sys.stderr, dynamic_ncols=True)

    def update(self, nbytes: int, tokens: int) -> None:
        self.done, self.bytes, self.tokens = self.done + 1, self.bytes + nbytes, self.tokens + tokens
        now = time.perf_counter()
        rate = self.bytes / 1e6 / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:.1f} MB/s, {self.tokens:,} tokens", refresh=False)
            self.bar.update(1)
        elif now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            self.log(f"prepare-data: {self.done}/{self.total} shards, {rate:.1f} MB/s, {self.tokens:,} tokens")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _piece_bytes(spec: SourceSpec, p: Piece, docs: list[str] | None) -> int:
    """Input bytes of a piece (characters for documents in memory, the file's share for Parquet)."""
    if docs is not None:
        return sum(len(d) for d in docs)
    if spec.kind == "parquet":
        import pyarrow.parquet as pq

        groups = max(1, pq.ParquetFile(p.file).num_row_groups)
        return os.path.getsize(p.file) * (p.end - p.start) // groups
    return p.end - p.start


def run_prepare(cfg, out: str, *, workers: int | None = None, task: int = 0, tasks: int = 1,
                log=print, progress_every_s: float = 10.0) -> PrepareResult:
    """Prepare this task's pieces of every source of ``cfg`` into ``out``. Every input is checked and
    the tokenizer built before anything is written; a prepare that stops on an error leaves
    ``FAILED`` beside its plan, so that a rerun with the input fixed may start over."""
    if not 0 <= task < tasks:
        raise ConfigError(f"--task: {task} must be in [0, --tasks={tasks})")
    check_out(out)
    workers = workers or cfg.data.workers
    specs = source_specs(cfg.data)
    inputs: dict[int, list[str]] = {}
    docs: dict[int, list[str]] = {}
    for si, spec in enumerate(specs):  # every input checked before any work
        where = f"data.sources[{si}]" if cfg.data.sources else "data"
        if spec.kind == "embedded":
            docs[si] = embedded_documents(spec.embedded, spec.max_chars)
            inputs[si] = [f"embedded:{spec.embedded}"]
        elif spec.kind == "hub":
            inputs[si] = [f"hub:{spec.dataset}/{spec.subset or ''}:{spec.split}"]
        else:
            inputs[si] = [os.path.abspath(f) for f in resolve_files(spec, where)]
    tok = build_prepare_tokenizer(cfg, specs, inputs[0])
    dtype = shards.dtype_for_vocab(len(tok))
    pieces = {si: plan_pieces(si, spec, inputs[si], docs.get(si), cfg.data.shard_bytes)
              for si, spec in enumerate(specs) if spec.kind != "hub"}
    plan = {"sources": [asdict(s) for s in specs], "inputs": inputs, "tokenizer": tok.fingerprint,
            "shard_bytes": cfg.data.shard_bytes, "dtype": dtype.name,
            "pieces": {specs[si].name: [asdict(p) for p in ps] for si, ps in pieces.items()}}
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out: {out!r} cannot be made ({exc.strerror or exc}); give a writable directory") from None
    _check_plan(out, plan)
    tok_dir = save_tokenizer(tok, out)
    if not os.path.isfile(os.path.join(out, PLAN)):
        atomic.write_text(os.path.join(out, PLAN), json.dumps(plan, indent=1, sort_keys=True))
    try:
        result = _write_shards(cfg, out, specs, pieces, docs, inputs, tok, tok_dir, dtype, workers, task, tasks,
                               log, progress_every_s)
    except Exception as exc:  # bad content found by a worker, a full disk: the plan no longer binds a rerun
        atomic.write_text(os.path.join(out, FAILED), f"{exc}\n")
        raise
    if os.path.exists(os.path.join(out, FAILED)):
        os.remove(os.path.join(out, FAILED))
    return result


def _write_shards(cfg, out, specs, pieces, docs, inputs, tok, tok_dir, dtype, workers, task, tasks, log,
                  progress_every_s) -> PrepareResult:
    """Tokenize this task's unfinished pieces into shards; write the manifests when all exist."""
    for spec in specs:
        os.makedirs(os.path.join(out, spec.name), exist_ok=True)
    if tasks == 1:  # an array task's neighbours may be writing theirs
        _remove_stale_temporaries(out, [s.name for s in specs])

    ordered = [p for si in sorted(pieces) for p in pieces[si]]
    mine = [p for k, p in enumerate(ordered) if k % tasks == task]
    todo = [p for p in mine if shards.shard_record(os.path.join(out, specs[p.source].name), p.index) is None]
    log(f"prepare-data: {len(ordered)} shards in {len(specs)} source(s); task {task}/{tasks} has {len(mine)}, "
        f"{len(mine) - len(todo)} already done; {workers} worker(s)")
    sizes: dict[tuple[int, int], int] = {}  # input bytes of every piece handed out

    def tasks_iter():
        for p in todo:
            d = docs.get(p.source)
            part = d[p.start:p.end] if d is not None else None
            sizes[p.source, p.index] = _piece_bytes(specs[p.source], p, part)
            yield specs[p.source], p, part, os.path.join(out, specs[p.source].name)
        for si, spec in enumerate(specs):
            if spec.kind == "hub" and task == 0:
                for p, ds in _stream_hub(spec, si, cfg.data.shard_bytes):
                    if shards.shard_record(os.path.join(out, spec.name), p.index) is None:
                        sizes[si, p.index] = _piece_bytes(spec, p, ds)
                        yield spec, p, ds, os.path.join(out, spec.name)
                    pieces.setdefault(si, []).append(p)

    tok_json = os.path.join(tok_dir, "tokenizer.json")
    init = (tok_json, int(tok.eos_token_id), dtype.name, os.getpid())
    progress = Progress(len(todo), log, progress_every_s, bar=sys.stderr.isatty() and progress_every_s > 0)
    started = time.perf_counter()
    try:
        if workers == 1:
            init_worker(*init)
            for si, idx, n in map(encode_piece, tasks_iter()):
                progress.update(sizes.get((si, idx), 0), n)
        else:
            ctx = multiprocessing.get_context("spawn")  # no forked tokenizer thread pools
            with ctx.Pool(workers, initializer=init_worker, initargs=init) as pool:  # exit: workers terminated
                for si, idx, n in pool.imap_unordered(encode_piece, tasks_iter()):
                    progress.update(sizes.get((si, idx), 0), n)
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    done_tokens = progress.tokens
    log(f"prepare-data: task {task} wrote {len(todo)} shard(s), {done_tokens:,} tokens in {seconds:.1f} s")
    finished = not (any(s.kind == "hub" for s in specs) and task != 0) and \
        _finalize(out, specs, pieces, tok, dtype, inputs)
    if finished:
        log(f"prepare-data: manifests written in {out}; train with data.source: prepared and "
            f"data.prepared: {[{'path': os.path.join(out, s.name), 'weight': s.weight} for s in specs]}")
    else:
        log("prepare-data: other tasks still have shards to write; the last one writes the manifests")
    return PrepareResult(finished, len(todo), done_tokens, seconds)


class Stopped(BaseException):
    """SIGTERM or SIGINT reached prepare-data (``signum``): the workers are stopped, nothing finished
    is lost (a rerun continues)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise :class:`Stopped` in the main thread (so the pool's exit terminates
    the workers) instead of ending the process at once; the previous handlers come back after."""

    def handler(signum, _frame):
        raise Stopped(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _array_task() -> tuple[int, int]:
    """(task, tasks) of a SLURM array task, (0, 1) outside one."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    lo = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return int(os.environ["SLURM_ARRAY_TASK_ID"]) - lo, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))


def main(argv: list[str] | None = None, *, load_config) -> int:
    """``bigbatch prepare-data``; ``load_config(path, overrides, sections=...)``: the run config's loader
    (:func:`bigbatch.training.config.load_config`, given by the command line's dispatcher)."""

    def body() -> int:
        p = argparse.ArgumentParser(prog="bigbatch prepare-data", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", required=True, help="config whose tokenizer and data sections to prepare")
        p.add_argument("--out", required=True, help="output directory (a restart continues it)")
        p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: data.workers)")
        p.add_argument("--task", type=int, default=None, help="this task's number (default: the SLURM array's)")
        p.add_argument("--tasks", type=int, default=None, help="number of tasks (default: the SLURM array's)")
        args, rest = p.parse_known_args(argv)
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers: {args.workers} must be >= 1")
        cfg = load_config(args.config, rest, sections=PREPARE_SECTIONS)
        task, tasks = _array_task()
        task = task if args.task is None else args.task
        tasks = tasks if args.tasks is None else args.tasks
        if tasks < 1:
            raise ConfigError(f"--tasks: {tasks} must be >= 1")
        try:
            with stop_on_signals():
                run_prepare(cfg, args.out, workers=args.workers, task=task, tasks=tasks,
                            log=lambda m: print(m, flush=True))
        except Stopped as stop:
            print(f"prepare-data: stopped by {signal.Signals(stop.signum).name}; its workers are stopped and "
                  "a rerun continues from the finished shards", file=sys.stderr, flush=True)
            return 128 + stop.signum
        return 0

    return command_main(body)

