"""What goes wrong around ``bigbatch prepare-data`` and prepared mixtures: bad input in any source
(the first one, that the BPE trains on, included) refused with one line before anything is written,
empty files and non-string text refused, ``--out`` that is not a directory, a failed prepare rerun
after its input is fixed, SIGTERM taking the workers down with the parent, the progress lines,
results readable by others under the umask, and a mixture's eval loss weighting its sources."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from test_prepare import BIGBATCH, TINY, WORDS_A, WORDS_B, _jsonl, _mixture_config
from train_common import PY, REPO, check_ok, env, records, run, small_args

from bigbatch.data.prepare import PREPARE_SECTIONS, run_prepare
from bigbatch.training.config import load_config


def _prepare(argv, capsys) -> tuple[int, str]:
    from bigbatch.data.prepare import main as prepare_main

    rc = prepare_main(argv, load_config=load_config)
    return rc, capsys.readouterr().err


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a bad JSONL file, text its error line must hold)."""
    good_line = json.dumps({"text": "the quick brown fox"}) + "\n"
    offset = str(len(good_line.encode()) * 3)
    bad = {}
    p = tmp_path / "notjson.jsonl"
    p.write_text(good_line * 3 + "this is not json\n" + good_line)
    bad["notjson"] = (p, f"byte {offset}")
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(good_line.encode() * 3 + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    bad["latin1"] = (p, f"byte {offset}")
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    bad["empty"] = (p, "empty")
    p = tmp_path / "number.jsonl"
    p.write_text(good_line * 3 + json.dumps({"text": 12345}) + "\n")
    bad["number"] = (p, f"byte {offset}")
    return bad


@pytest.mark.parametrize("case", ["notjson", "latin1", "empty", "number"])
@pytest.mark.parametrize("position", [0, 1])
def test_bad_source_exits_2_with_one_line(tmp_path, capsys, case, position):
    """A bad file as the first source (the BPE trains on it) or a later one: exit 2, one line naming
    the file and where; as the first source nothing is written."""
    path, where = _bad_files(tmp_path)[case]
    good = str(_jsonl(tmp_path / "good.jsonl", 300, 0, WORDS_A))
    cfg = _mixture_config(tmp_path, str(path), good) if position == 0 else _mixture_config(tmp_path, good, str(path))
    out = tmp_path / "prep"
    rc, err = _prepare(["--config", str(cfg), "--out", str(out)], capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and where in lines[0], lines[0]
    if case == "number":
        assert "string" in lines[0]
    if case == "empty":
        assert f"data.sources[{position}]" in lines[0]
    if position == 0 or case == "empty":  # found before any work
        assert not out.exists()


def test_source_of_blank_lines_exits_2(tmp_path, capsys):
    """A JSONL file of blank lines has bytes but no document: the source is refused, not made a
    0-token source that training refuses later."""
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n \n\n")
    cfg = _mixture_config(tmp_path, str(_jsonl(tmp_path / "a.jsonl", 100, 0, WORDS_A)), str(blank))
    rc, err = _prepare(["--config", str(cfg), "--out", str(tmp_path / "prep")], capsys)
    assert rc == 2 and "'code'" in err and str(blank) in err and "no documents" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "prep" / "manifest.json").exists()


def test_out_that_is_not_a_directory_exits_2(tmp_path, capsys):
    cfg = _mixture_config(tmp_path, str(_jsonl(tmp_path / "a.jsonl", 50, 0, WORDS_A)),
                          str(_jsonl(tmp_path / "b.jsonl", 50, 1, WORDS_B)))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub" / "prep"):
        rc, err = _prepare(["--config", str(cfg), "--out", str(out)], capsys)
        assert rc == 2 and "--out" in err and str(afile) in err and len(err.strip().splitlines()) == 1, err
    assert afile.read_text() == "x"


def test_failed_prepare_reruns_after_the_input_is_fixed(tmp_path, capsys):
    """A prepare that stopped on a bad line (in a later source, found while tokenizing) does not
    block a rerun once the line is fixed in place; a completed prepare of other inputs is refused."""
    a = _jsonl(tmp_path / "a.jsonl", 300, 0, WORDS_A)
    b = _jsonl(tmp_path / "b.jsonl", 300, 1, WORDS_B)
    lines = b.read_text().splitlines(keepends=True)
    lines[200] = "{broken\n"
    b.write_text("".join(lines))
    cfg = _mixture_config(tmp_path, str(a), str(b))
    out = tmp_path / "prep"
    rc, err = _prepare(["--config", str(cfg), "--out", str(out)], capsys)
    assert rc == 2 and str(b) in err and len(err.strip().splitlines()) == 1, err
    lines[200] = json.dumps({"text": "def fixed(self): return yield"}) + "\n"
    b.write_text("".join(lines))
    rc, err = _prepare(["--config", str(cfg), "--out", str(out)], capsys)
    assert rc == 0, err
    assert (out / "manifest.json").exists()
    # the result is the one a fresh --out gets
    fresh = tmp_path / "fresh"
    assert run_prepare(load_config(cfg, sections=PREPARE_SECTIONS), str(fresh), log=lambda m: None).finished
    tree = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert tree == {str(p.relative_to(fresh)): p.read_bytes() for p in sorted(fresh.rglob("*")) if p.is_file()}
    # a completed prepare of other inputs is still refused
    other = _mixture_config(tmp_path, str(a), str(a))
    rc, err = _prepare(["--config", str(other), "--out", str(out)], capsys)
    assert rc == 2 and "other inputs" in err, err


def test_prepare_reports_progress(tmp_path):
    cfg = _mixture_config(tmp_path, str(_jsonl(tmp_path / "a.jsonl", 400, 0, WORDS_A)),
                          str(_jsonl(tmp_path / "b.jsonl", 200, 1, WORDS_B)))
    lines: list[str] = []
    res = run_prepare(load_config(cfg, sections=PREPARE_SECTIONS), str(tmp_path / "prep"), log=lines.append,
                      progress_every_s=0)
    progress = [m for m in lines if "MB/s" in m]
    n = len(json.loads((tmp_path / "prep" / "prose" / "manifest.json").read_text())["shards"]) + \
        len(json.loads((tmp_path / "prep" / "code" / "manifest.json").read_text())["shards"])
    assert len(progress) == n, lines
    assert progress[-1].startswith(f"prepare-data: {n}/{n} shards") and f"{res.tokens:,} tokens" in progress[-1]


@pytest.mark.slow
def test_sigterm_takes_the_workers_down(tmp_path):
    """SIGTERM to prepare-data once it has written a shard: it exits 143 and its workers are gone
    (no process left, no shard written after)."""
    files = [_jsonl(tmp_path / f"in{i}.jsonl", 1500, i, WORDS_A) for i in range(3)]
    cfg = _mixture_config(tmp_path, str(tmp_path / "in*.jsonl"), str(files[0]))
    out = tmp_path / "prep"
    proc = subprocess.Popen([*BIGBATCH, "prepare-data", "--config", str(cfg), "--out", str(out), "--workers", "2"],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ((out / "prose").is_dir() and any((out / "prose").glob("shard-*.json"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.005)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    at_exit = sorted(p.name for p in out.rglob("shard-*.json"))
    _gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [(p.pid, p.ppid()) for p in alive]
    # nothing finished a shard after the parent was gone
    assert sorted(p.name for p in out.rglob("shard-*.json")) == at_exit
    assert rc == 128 + signal.SIGTERM, proc.stdout.read().decode()
    assert not (out / "manifest.json").exists()


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_results_honour_the_umask(tmp_path):
    """Under umask 022 the BPE cache, a run's tokenizer/ and an exported model directory are 0755
    directories and 0644 files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bigbatch.training.export import write_model_dir
    from bigbatch.training.run_dir import save_model_files
    from bigbatch.data.tokenizer import train_bpe

    old = os.umask(0o022)
    try:
        tok = train_bpe(["the quick brown fox"] * 50, 300, str(tmp_path / "bpe"))
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)
        save_model_files(str(run_dir), tok, config)
        write_model_dir(str(tmp_path / "hf"), LlamaForCausalLM(config), tok, max_shard_size="5GB")
    finally:
        os.umask(old)
    for root in (tmp_path / "bpe", run_dir / "tokenizer", tmp_path / "hf"):
        modes = _modes(root)
        assert "model.safetensors" in modes or root != tmp_path / "hf"
        bad = {k: oct(m) for k, m in modes.items() if m != (0o755 if (root / k).is_dir() else 0o644)}
        assert not bad, (root, bad)


@pytest.mark.slow
def test_mixture_eval_loss_weights_its_sources(tmp_path, cache):
    """With a 0.7/0.3 mixture, eval_loss is 0.7 x eval_loss/prose + 0.3 x eval_loss/code (each over its
    own held-out blocks), not the first source's."""
    cfg = _mixture_config(tmp_path, str(_jsonl(tmp_path / "a.jsonl", 800, 0, WORDS_A)),
                          str(_jsonl(tmp_path / "b.jsonl", 600, 1, WORDS_B)))
    assert run_prepare(load_config(cfg, sections=PREPARE_SECTIONS), str(tmp_path / "prep"), log=lambda m: None).finished
    out = tmp_path / "run"
    proc = run([PY, "train.py", "--config", TINY, "--out", str(out), *small_args(cache), "--train.max_steps", "5",
                "--data.source", "prepared", "--data.seq_len", "32", "--tokenizer.vocab_size", "300",
                "--data.prepared", f"[{{path: {tmp_path / 'prep' / 'prose'}, weight: 0.7}}, "
                                   f"{{path: {tmp_path / 'prep' / 'code'}, weight: 0.3}}]"])
    check_ok(proc)
    evals = records(out, "eval")
    assert evals
    # what the run prints is the mixture's loss too
    assert f"final eval: loss {evals[-1]['eval_loss']:.4f}" in proc.stdout + proc.stderr
    assert f"eval step {evals[-1]['step']}: loss {evals[-1]['eval_loss']:.4f}" in proc.stdout + proc.stderr
    for ev in evals:
        mixed = 0.7 * ev["eval_loss/prose"] + 0.3 * ev["eval_loss/code"]
        assert ev["eval_loss"] == pytest.approx(mixed, rel=1e-9), ev
        assert ev["eval_loss"] != ev["eval_loss/prose"]
        assert ev["eval_ppl"] == pytest.approx(np.exp(mixed), rel=1e-9)
