"""``bigbatch status RUN_DIR``: a run directory on one screen (tags, batch, B_noise, last records,
finished or still written), and its bad input. The run directory is made of real tags
(:mod:`bigbatch.sharding.tags`: manifests with hashes, ``latest``, torch-saved metas) and a
``metrics.jsonl`` in train.py's format, without training."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml

from bigbatch.cli import main as cli_main
from bigbatch.sharding import tags
from bigbatch.training.status import status_lines


def _tag(ckpt: Path, step: int, world: int = 2) -> Path:
    path = ckpt / f"step{step:08d}"
    path.mkdir(parents=True)
    torch.save({"format": tags.FORMAT, "engine": "deepspeed", "world_size": world, "zero_stage": 1,
                "client_state": {"step": step, "samples": step * 16, "tokens": step * 16 * 64}}, path / tags.META)
    (path / "bigbatch_full_state_part0.pt").write_bytes(os.urandom(256))
    tags.write_manifest(str(ckpt), path.name, {f: tags.file_hash(str(path / f)) for f in tags.tag_files(str(path))},
                        samples=step * 16, steps=step)
    return path


def _run(root: Path, steps: int = 6, total: int = 10) -> Path:
    run = root / "run"
    run.mkdir()
    plan = {"world_size": 2, "micro_batch": 8, "grad_accum": 1, "global_batch": 16, "kappa": 1.0}
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {"seq_len": 64},
                                                              "resolved": {"plan": plan, "total_steps": total}}))
    t0 = time.time() - 60
    lines = [{"kind": "train", "step": s, "tokens": s * 1024, "loss": 5.0 - s / 10, "lr": 1e-3, "global_batch": 16,
              "kappa": 1.0, "time": t0 + s, **({"noise_scale": 41.234} if s == 4 else {})} for s in range(1, steps + 1)]
    lines.append({"kind": "eval", "step": steps, "tokens": steps * 1024, "eval_loss": 4.25, "eval_ppl": 70.1,
                  "time": t0 + steps})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ckpt = run / "checkpoints"
    _tag(ckpt, 3)
    _tag(ckpt, 6)
    tags.write_latest(str(ckpt), "step00000006")
    (ckpt / "step00000009").mkdir()  # a save that never finished
    return run


def test_status_shows_tags_batch_records_and_whether_it_runs(tmp_path, capsys):
    run = _run(tmp_path)
    victim = run / "checkpoints" / "step00000003" / "bigbatch_full_state_part0.pt"
    with open(victim, "r+b") as fh:  # bit rot: the size is right, the content is not
        fh.write(b"\0" * 16)
    lines = status_lines(str(run), records=2)
    assert lines[0] == f"run {run}"
    assert lines[1] == "not finished: step 6 of 10; metrics.jsonl written 0 s ago: probably still being written"
    assert lines[2] == "batch in force: global batch 16 = 8 x 1 accum x 2 proc(s) (kappa 1); B_noise 41.23 at step 4"
    rows = {ln.split()[0]: ln for ln in lines if ln.startswith("  step")}
    assert rows["step00000006"].split()[1:6] == ["6", "6,144", "deepspeed", "2", "good"]
    assert rows["step00000006"].endswith("good (latest)")
    assert rows["step00000003"].endswith("good")  # sizes only by default
    assert "incomplete: " in rows["step00000009"] and "did not finish" in rows["step00000009"]
    assert list(rows) == ["step00000006", "step00000003", "step00000009"]  # newest first, incomplete last
    assert lines[-3:] == ["last records (2 of 7):",
                          "  train          step 6 tokens 6,144 | loss 4.4 | lr 0.001 | global_batch 16",
                          "  eval           step 6 tokens 6,144 | eval_loss 4.25 | eval_ppl 70.1"]
    # --hash reads every byte: the rotten tag is damaged, naming the file
    assert cli_main(["status", str(run), "--hash"]) == 0
    out = capsys.readouterr().out
    assert f"damaged: {victim}: content hash" in out
    # an hour without a record: stopped
    old = time.time() - 3600
    os.utime(run / "metrics.jsonl", (old, old))
    assert "not running (stopped, preempted or killed; --resume continues it)" in status_lines(str(run))[1]


def test_status_of_a_finished_run(tmp_path):
    run = _run(tmp_path, steps=10, total=10)
    old = time.time() - 600
    os.utime(run / "metrics.jsonl", (old, old))
    assert status_lines(str(run))[1] == "finished: step 10 of 10; metrics.jsonl written 600 s ago"


def test_status_bad_input_is_exit_2_and_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, text in [([str(tmp_path / "empty")], "is not a run directory (no config.resolved.yaml"),
                       ([str(tmp_path / "nope")], "is not a directory"),
                       ([str(tmp_path), "--records", "-1"], "--records: -1 must be >= 0"),
                       ([str(tmp_path), "--bogus"], "unrecognized arguments: --bogus")]:
        try:
            code = cli_main(["status", *argv])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, (argv, err)
