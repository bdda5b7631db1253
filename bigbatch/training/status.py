"""``bigbatch status RUN_DIR``: one screen on a run directory, read without starting anything.

* the run: finished or not (the last logged step against the step budget in ``config.resolved.yaml``),
  and whether it is probably still being written (``metrics.jsonl`` changed within a few logging
  intervals);
* the batch in force (global batch, micro batch, accumulation, world size, kappa) and the last gradient
  noise scale B_noise measured;
* every checkpoint tag, newest first: step, tokens, engine, world size, good or damaged (and why), and
  which one ``latest`` names. Sizes are checked; ``--hash`` also checks every file's content hash (reads
  every byte);
* the last records of ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import time

import yaml

from bigbatch.cli_parser import ArgumentParser, command_main
from bigbatch.sharding import tags
from bigbatch.training.config import ConfigError
from bigbatch.training.metrics import read_metrics
from bigbatch.training.run_dir import RESOLVED

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def _resolved(run_dir: str) -> dict:
    path = os.path.join(run_dir, RESOLVED)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def tag_rows(ckpt_dir: str, seq_len: int | None, hashes: bool = False) -> list[dict]:
    """One dict per tag directory, newest first: ``tag, step, tokens, engine, world_size, state, why,
    latest`` (state: ``good``, ``damaged`` or ``incomplete``)."""
    try:
        latest = tags.read_latest(ckpt_dir)
    except tags.CheckpointError:
        latest = None
    rows = []
    for info in reversed(tags.scan(ckpt_dir)):
        row = {"tag": info.tag, "step": None, "tokens": None, "engine": None, "world_size": None,
               "state": "incomplete", "why": info.why, "latest": info.tag == latest}
        if info.complete:
            try:
                manifest = tags.read_manifest(ckpt_dir, info.tag)
                samples = manifest.get("samples")
                row.update(step=manifest.get("steps"), world_size=manifest.get("world_size"),
                           tokens=samples * seq_len if samples and samples > 0 and seq_len else None)
                tags.verify_tag(ckpt_dir, info.tag, hashes=hashes, pickles=True)
                meta = tags.read_meta(ckpt_dir, info.tag)
            except tags.CheckpointError as exc:
                row.update(state="damaged", why=str(exc))
            else:
                client = meta.get("client_state") or {}
                row.update(state="good", why="", engine=meta.get("engine") or ("deepspeed" if "zero_stage" in meta
                                                                                 else "fsdp2"),
                           world_size=meta.get("world_size", row["world_size"]), step=client.get("step", row["step"]),
                           tokens=client.get("tokens", row["tokens"]))
        rows.append(row)
    return rows


def _num(value, fmt: str = ",") -> str:
    return "-" if value is None else format(value, fmt)


def _record_line(r: dict) -> str:
    """A metrics record as one short line (kind, step, tokens, then its main values)."""
    head = f"{r.get('kind', '?'):<14} step {_num(r.get('step'))} tokens {_num(r.get('tokens'))}"
    keys = {"train": ("loss", "lr", "global_batch", "grad_norm", "noise_scale"), "eval": ("eval_loss", "eval_ppl"),
            "batch_change": ("reason", "global_batch", "kappa", "noise_scale"),
            "batch_decision": ("global_batch", "noise_scale", "reason")}.get(r.get("kind"), ("message", "reason"))
    parts = [f"{k} {format(r[k], '.4g') if isinstance(r[k], float) else r[k]}" for k in keys if r.get(k) is not None]
    return head + (" | " + " | ".join(parts) if parts else "")


def status_lines(run_dir: str, *, records: int = 5, hashes: bool = False, now: float | None = None) -> list[str]:
    """The screen :func:`main` prints (see the module docstring); ConfigError naming RUN_DIR when it
    is not a run directory."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"RUN_DIR: {run_dir!r} is not a directory")
    metrics_path, ckpt_dir = os.path.join(run_dir, METRICS), os.path.join(run_dir, CHECKPOINTS)
    if not any(os.path.exists(os.path.join(run_dir, f)) for f in (RESOLVED, METRICS, CHECKPOINTS)):
        raise ConfigError(f"RUN_DIR: {run_dir!r} is not a run directory (no {RESOLVED}, {METRICS} or {CHECKPOINTS}/)")
    now = time.time() if now is None else now
    full = _resolved(run_dir)
    resolved = full.get("resolved") or {}
    seq_len = (full.get("data") or {}).get("seq_len")
    try:
        recs = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    except (OSError, ValueError) as exc:
        raise ConfigError(f"RUN_DIR: {metrics_path} cannot be read ({exc})") from None
    train = [r for r in recs if r.get("kind") == "train"]
    last_step = max((int(r.get("step") or 0) for r in recs), default=0)
    total = resolved.get("total_steps")
    out = [f"run {os.path.abspath(run_dir)}"]

    finished = bool(total) and last_step >= total
    state = (f"finished: step {last_step:,} of {total:,}" if finished
             else f"not finished: step {last_step:,} of {_num(total)}")
    if os.path.isfile(metrics_path):
        age = now - os.path.getmtime(metrics_path)
        times = [r["time"] for r in train[-2:] if isinstance(r.get("time"), (int, float))]
        gap = times[1] - times[0] if len(times) == 2 else 0.0
        # within a few logging intervals of the last record (a finished run only writes its plot after it)
        live = age < (60.0 if finished else min(1800.0, max(120.0, 3 * gap)))
        state += f"; {METRICS} written {age:,.0f} s ago"
        if live:
            state += ": probably still being written"
        elif not finished:
            state += ": not running (stopped, preempted or killed; --resume continues it)"
    else:
        state += f"; no {METRICS} yet"
    out.append(state)

    plan = resolved.get("plan") or {}
    batch = next((r for r in reversed(recs) if r.get("kind") in ("batch_change", "train") and r.get("global_batch")),
                 None)
    global_batch = batch["global_batch"] if batch else plan.get("global_batch")
    line = f"batch in force: global batch {_num(global_batch)}"
    if batch and batch.get("kind") == "batch_change" and batch.get("micro_batch"):
        line += f" = {batch['micro_batch']} x {batch.get('grad_accum')} accum"
    elif plan and plan.get("global_batch") == global_batch:
        line += f" = {plan.get('micro_batch')} x {plan.get('grad_accum')} accum x {plan.get('world_size')} proc(s)"
    if batch and batch.get("kappa") is not None:
        line += f" (kappa {batch['kappa']:g})"
    noise = next((r for r in reversed(recs) if r.get("noise_scale") is not None), None)
    line += (f"; B_noise {noise['noise_scale']:.4g} at step {noise.get('step')}" if noise
             else "; B_noise not measured")
    out.append(line)

    rows = tag_rows(ckpt_dir, seq_len, hashes=hashes)
    checked = "sizes and content hashes" if hashes else "sizes checked; --hash also checks contents"
    if not rows:
        out.append(f"checkpoints: none in {ckpt_dir}")
    else:
        out.append(f"checkpoints in {ckpt_dir} (newest first, incomplete last; {checked}):")
        out.append(f"  {'tag':<16} {'step':>9} {'tokens':>14} {'engine':<10} {'world':>5}  state")
        for r in rows:
            what = r["state"] + (" (latest)" if r["latest"] else "") + (f": {r['why']}" if r["why"] else "")
            out.append(f"  {r['tag']:<16} {_num(r['step']):>9} {_num(r['tokens']):>14} {r['engine'] or '-':<10} "
                       f"{_num(r['world_size']):>5}  {what}")
    if recs:
        out.append(f"last records ({min(records, len(recs))} of {len(recs):,}):")
        out += [f"  {_record_line(r)}" for r in recs[-records:]]
    return out


def main(argv: list[str] | None = None) -> int:
    """``bigbatch status RUN_DIR [--records N] [--hash]``."""
    p = ArgumentParser(prog="bigbatch status", description="A run directory on one screen: checkpoints, batch, "
                                                           "last records, finished or running.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a train.py run directory")
    p.add_argument("--records", type=int, default=5, help="how many of the last metrics records to show")
    p.add_argument("--hash", action="store_true", help="check every checkpoint file's content hash (reads them)")

    def body() -> int:
        args = p.parse_args(argv)
        if args.records < 0:
            raise ConfigError(f"--records: {args.records} must be >= 0")
        print("\n".join(status_lines(args.run_dir, records=args.records, hashes=args.hash)), flush=True)
        return 0

    return command_main(body)
