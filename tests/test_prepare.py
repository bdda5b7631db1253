"""bigbatch prepare-data and training from prepared shards: the same blocks and losses as the in-job
path, byte-identical restarts, damaged shards refused, mixtures that keep their weights, bad input,
and a SLURM array on the two-node test cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from train_common import PY, REPO, check_ok, env, main, records, run, small_args

from bigbatch.data.mixture import MixtureStream, open_prepared
from bigbatch.data.prepare import PREPARE_SECTIONS, run_prepare
from bigbatch.training.config import load_config
from bigbatch.data.corpus import load_corpus
from bigbatch.data.blocks import GlobalBatchLoader, build_packed_data
from bigbatch.data.tokenizer import build_tokenizer

BIGBATCH = [PY, "-m", "bigbatch.cli"]
TINY = str(REPO / "configs" / "tiny.yaml")


def _jsonl(path: Path, n_docs: int, seed: int, words: list[str]) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(5, 60))))}) + "\n")
    return path


WORDS_A = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
WORDS_B = "def return import class self lambda yield async await try except".split()


def _mixture_config(tmp_path: Path, files_a: str, files_b: str, weight_b: float = 0.3) -> Path:
    cfg = {"tokenizer": {"kind": "bpe", "vocab_size": 300, "train_chars": 50000},
           "data": {"cache_dir": str(tmp_path / "cache"), "shard_bytes": 20000,
                    "sources": [{"name": "prose", "kind": "json", "files": [files_a], "weight": 0.7},
                                {"name": "code", "kind": "json", "files": [files_b], "weight": weight_b}]}}
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepared_blocks_equal_in_job_blocks(tmp_path, cache):
    """The shards of the embedded corpus, cut into blocks, are the in-job path's tokens.npy blocks."""
    ov = small_args(cache)[:8] + ["--data.shard_bytes", "40000"]
    cfg = load_config(TINY, ov)
    corpus = load_corpus(cfg.data)
    tok = build_tokenizer(cfg.tokenizer, corpus, cfg.data.cache_dir)
    packed = build_packed_data(corpus, tok, cfg.data)
    # the in-job blocks are the HF tokenizer's ids of every document, each followed by eos, cut into blocks
    ids = tok(list(corpus.dataset["text"]), add_special_tokens=False)["input_ids"]
    stream = np.concatenate([np.asarray(x + [tok.eos_token_id]) for x in ids])
    n = len(stream) // cfg.data.seq_len
    np.testing.assert_array_equal(np.concatenate([packed.train, packed.val]),
                                  stream[: n * cfg.data.seq_len].reshape(n, cfg.data.seq_len))
    assert run_prepare(cfg, str(tmp_path / "prep"), log=lambda m: None).finished
    man = json.loads((tmp_path / "prep" / "embedded" / "manifest.json").read_text())
    assert len(man["shards"]) > 2 and man["dtype"] == "uint16" and man["tokenizer"] == tok.fingerprint
    cfg2 = load_config(TINY, ov + ["--data.source", "prepared", "--data.prepared",
                                   f"[{{path: {tmp_path / 'prep' / 'embedded'}}}]"])
    tok2, data = open_prepared(cfg2, check_hashes=True)
    assert tok2.fingerprint == tok.fingerprint
    np.testing.assert_array_equal(data.train[np.arange(len(data.train))], np.asarray(packed.train))
    np.testing.assert_array_equal(data.val[np.arange(len(data.val))], np.asarray(packed.val))
    # and the same sample order: a prepared single source reads the in-job stream
    a = GlobalBatchLoader(packed.train, micro_batch=4, grad_accum=2, rank=0, world_size=1, seed=7)
    b = GlobalBatchLoader(data.train, micro_batch=4, grad_accum=2, rank=0, world_size=1, seed=7)
    for _ in range(3):
        for x, y in zip(a.next_step(), b.next_step()):
            assert (x == y).all()


@pytest.mark.slow
def test_run_from_prepared_equals_in_job_run(tmp_path, cache):
    """train.py on the prepared directory and on the in-job path: the same losses, step by step."""
    args = small_args(cache) + ["--train.max_steps", "12"]
    prep = tmp_path / "prep"
    check_ok(run([*BIGBATCH, "prepare-data", "--config", TINY, "--out", str(prep), *small_args(cache)[:8],
                  "--data.shard_bytes", "40000"]))
    check_ok(run([PY, "train.py", "--config", TINY, "--out", str(tmp_path / "injob"), *args]))
    check_ok(run([PY, "train.py", "--config", TINY, "--out", str(tmp_path / "prepared"), *args,
                  "--data.source", "prepared", "--data.prepared", f"[{{path: {prep / 'embedded'}}}]"]))
    a, b = records(tmp_path / "injob"), records(tmp_path / "prepared")
    assert len(a) == len(b) == 12
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ea, eb = records(tmp_path / "injob", "eval"), records(tmp_path / "prepared", "eval")
    assert [r["eval_loss"] for r in ea] == [r["eval_loss"] for r in eb] and ea


@pytest.mark.slow
def test_killed_prepare_restarts_to_the_same_bytes(tmp_path):
    files = [_jsonl(tmp_path / f"in{i}.jsonl", 600, i, WORDS_A) for i in range(3)]
    cfg = _mixture_config(tmp_path, str(tmp_path / "in*.jsonl"), str(files[0]))
    whole = tmp_path / "whole"
    check_ok(run([*BIGBATCH, "prepare-data", "--config", str(cfg), "--out", str(whole), "--workers", "2"]))
    n_shards = len(json.loads((whole / "prose" / "manifest.json").read_text())["shards"])
    assert n_shards >= 6
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*BIGBATCH, "prepare-data", "--config", str(cfg), "--out", str(killed)],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (killed / "prose" / "shard-00001.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    restarted = run([*BIGBATCH, "prepare-data", "--config", str(cfg), "--out", str(killed)])
    check_ok(restarted)
    assert "already done" in restarted.stdout and " 0 already done" not in restarted.stdout
    assert _tree(killed) == _tree(whole)


def test_damaged_shard_is_refused_before_training(tmp_path, cache, capsys):
    files = _jsonl(tmp_path / "a.jsonl", 400, 0, WORDS_A)
    cfg = _mixture_config(tmp_path, str(files), str(_jsonl(tmp_path / "b.jsonl", 200, 1, WORDS_B)))
    assert run_prepare(load_config(cfg, sections=PREPARE_SECTIONS), str(tmp_path / "prep"), log=lambda m: None).finished
    shard = tmp_path / "prep" / "code" / "shard-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    out = tmp_path / "run"
    rc = main(["--config", TINY, "--out", str(out), *small_args(cache), "--data.source", "prepared",
               "--data.prepared", f"[{{path: {tmp_path / 'prep' / 'prose'}, weight: 0.7}}, "
                                  f"{{path: {tmp_path / 'prep' / 'code'}, weight: 0.3}}]"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(shard) in err and "xxh3" in err and "data.prepared[1].path" in err
    assert not (out / "metrics.jsonl").exists()


def test_mixture_shares_hold_in_every_window_at_any_world_size():
    stream = MixtureStream([5000, 800], [0.7, 0.3], seed=3)
    n = 60_000
    src = (stream.indices(0, n) >= 5000).astype(np.int64)  # 1 = the second source
    csum = np.concatenate([[0], np.cumsum(src)])
    share = (csum[10_000:] - csum[:-10_000]) / 10_000  # every window of 10,000 samples
    assert abs(share - 0.3).max() <= 0.01
    assert stream.counts(n).tolist() == [n - int(src.sum()), int(src.sum())]
    # the stream does not depend on the world size: 2 ranks x 2 micro steps read what 1 rank reads
    from bigbatch.data.mixture import MixtureBlocks

    class Rows:  # block i holds the value i
        def __init__(self, n):
            self.n, self.shape = n, (n, 1)

        def __len__(self):
            return self.n

        def __getitem__(self, ids):
            return np.asarray(ids)[:, None]

    blocks = MixtureBlocks(["a", "b"], [Rows(5000), Rows(800)], [0.7, 0.3])
    one = GlobalBatchLoader(blocks, micro_batch=8, grad_accum=2, rank=0, world_size=1, seed=3, samples_seen=123)
    two = [GlobalBatchLoader(blocks, micro_batch=4, grad_accum=2, rank=r, world_size=2, seed=3, samples_seen=123)
           for r in range(2)]
    for step in range(3):
        ref = np.concatenate([t.numpy().ravel() for t in one.next_step()])
        parts = [[t.numpy().ravel() for t in ld.next_step()] for ld in two]
        got = np.concatenate([parts[r][m] for m in range(2) for r in range(2)])
        idx = stream.indices(123 + 16 * step, 16)
        expected = np.where(idx >= 5000, idx - 5000, idx)  # each source's own block ids
        assert ref.tolist() == got.tolist() == expected.tolist()


@pytest.mark.slow
def test_mixture_run_logs_per_source_eval_and_tokens(tmp_path, cache):
    cfg = _mixture_config(tmp_path, str(_jsonl(tmp_path / "a.jsonl", 1500, 0, WORDS_A)),
                          str(_jsonl(tmp_path / "b.jsonl", 800, 1, WORDS_B)))
    check_ok(run([*BIGBATCH, "prepare-data", "--config", str(cfg), "--out", str(tmp_path / "prep"), "--workers", "2"]))
    out = tmp_path / "run"
    check_ok(run([PY, "train.py", "--config", TINY, "--out", str(out), *small_args(cache), "--train.max_steps", "10",
                  "--data.source", "prepared", "--data.seq_len", "32", "--tokenizer.vocab_size", "300",
                  "--data.prepared", f"[{{path: {tmp_path / 'prep' / 'prose'}, weight: 0.7}}, "
                                     f"{{path: {tmp_path / 'prep' / 'code'}, weight: 0.3}}]"]))
    evals = records(out, "eval")
    assert evals
    last = evals[-1]
    assert last["eval_loss/prose"] > 0 and last["eval_loss/code"] > 0
    assert last["eval_loss/prose"] != last["eval_loss/code"]
    assert last["tokens/prose"] + last["tokens/code"] == last["tokens"]
    assert abs(last["tokens/code"] / last["tokens"] - 0.3) < 0.02


def _prepare_main(argv, capsys) -> tuple[int, str]:
    from bigbatch.data.prepare import main as prepare_main

    rc = prepare_main(argv, load_config=load_config)
    return rc, capsys.readouterr().err


def test_bad_input_exits_2_naming_it(tmp_path, cache, capsys):
    good = _jsonl(tmp_path / "a.jsonl", 100, 0, WORDS_A)
    out = tmp_path / "prep"
    # no file matches a glob
    cfg = _mixture_config(tmp_path, str(good), str(tmp_path / "nothing-*.jsonl"))
    rc, err = _prepare_main(["--config", str(cfg), "--out", str(out)], capsys)
    assert rc == 2 and "data.sources[1].files" in err and "nothing-*.jsonl" in err and "matches no file" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    # a file that cannot be read (a dangling link: root reads any mode)
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "b.jsonl")
    cfg = _mixture_config(tmp_path, str(good), str(tmp_path / "b.jsonl"))
    rc, err = _prepare_main(["--config", str(cfg), "--out", str(out)], capsys)
    assert rc == 2 and "data.sources[1].files" in err and "b.jsonl" in err and "cannot be read" in err
    assert not out.exists()
    # a weight <= 0, for prepare and for training
    cfg = _mixture_config(tmp_path, str(good), str(good), weight_b=0)
    rc, err = _prepare_main(["--config", str(cfg), "--out", str(out)], capsys)
    assert rc == 2 and "data.sources[1].weight" in err and "> 0" in err and not out.exists()
    rc = main(["--config", TINY, "--out", str(tmp_path / "run"), "--data.source", "prepared",
               "--data.prepared", "[{path: x, weight: -1}]"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.prepared[0].weight" in err and "-1" in err
    # a prepared set built with another tokenizer than the run's
    cfg = _mixture_config(tmp_path, str(good), str(good))
    assert run_prepare(load_config(cfg, sections=PREPARE_SECTIONS), str(out), log=lambda m: None).finished
    other = load_config(TINY, small_args(cache)[:8])
    other_tok = build_tokenizer(other.tokenizer, load_corpus(other.data), other.data.cache_dir)
    other_tok.save_pretrained(tmp_path / "other-tok")
    rc = main(["--config", TINY, "--out", str(tmp_path / "run"), *small_args(cache), "--data.source", "prepared",
               "--tokenizer.kind", "pretrained", "--tokenizer.path", str(tmp_path / "other-tok"),
               "--data.prepared", f"[{{path: {out / 'prose'}}}]"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.prepared[0].path" in err and str(out / "prose") in err and "tokenizer" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_slurm_array_prepare_on_two_nodes(slurm_cluster, tmp_path):
    """Two array tasks (one per node) each write their slice; the last writes the manifests, and the
    result is byte-identical to a local single-task prepare."""
    files = [_jsonl(tmp_path / f"in{i}.jsonl", 500, i, WORDS_A) for i in range(2)]
    cfg = _mixture_config(tmp_path, str(tmp_path / "in*.jsonl"), str(files[1]))
    local = tmp_path / "local"
    check_ok(run([*BIGBATCH, "prepare-data", "--config", str(cfg), "--out", str(local)]))
    out = tmp_path / "array"
    proc = slurm_cluster.run(*BIGBATCH, "submit", "--time", "10", "--chdir", str(REPO), "--no-requeue",
                             "--output", str(tmp_path / "slurm-%A_%a.out"), "--sbatch-arg=--array=0-1",
                             "--", "-m", "bigbatch.cli", "prepare-data", "--config", str(cfg),
                             "--out", str(out), env=env())
    job = proc.stdout.strip()
    assert job.isdigit(), proc.stdout + proc.stderr
    deadline = time.monotonic() + 240
    while not (out / "manifest.json").exists():
        logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("slurm-*.out"))
        assert time.monotonic() < deadline, f"no manifest; job {job}\n{logs}\n{slurm_cluster.logs()}"
        time.sleep(0.5)
    slurm_cluster.wait_done(job, timeout=120)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))
    assert "task 0/2" in logs and "task 1/2" in logs, logs
    assert _tree(out) == _tree(local)
