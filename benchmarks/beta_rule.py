"""Which betas to carry at a batch change: ``bigbatch check-rules`` branches from warm checkpoints of the
tiny config, one per ``batch.beta_form``, for AdamW, AdaBound and RAdam.

For each optimizer, one train.py run (configs/tiny.yaml, batch 16) saves checkpoints along the way; at
each of ``--points`` (optimizer steps) a run directory holding only that checkpoint is the starting
point of ``bigbatch check-rules``: ``k1`` and ``k1_seed2`` once (the seed-to-seed gap), then the
branch ``k<kappa>`` (batch kappa x 16, lr x sqrt(kappa), eps / sqrt(kappa)) once per beta form:

* ``paper``: 1 - kappa (1 - beta) for every beta (the SDE rule, Malladi et al. 2022);
* ``power``: beta ** kappa;
* ``keep_beta1``: beta1 kept, beta2 by the paper rule;
* ``keep``: both kept.

Each form rescales Adam's second moment at the change (``batch.second_moment: rescale``, the default);
``FORM:keep`` runs it with the second moment kept instead (``paper:keep``).

Printed per optimizer, point and form: the final eval loss of ``k<kappa>`` and its gap to ``k1`` after
the same tokens (negative: better), with the tolerance (max(1%, 2 x the seed gap)). Every number is
from check-rules' own result files (``OUT/<optimizer>/step<N>/<form>/branches/*/result.json``);
``OUT/beta_rule.json`` holds the table.

    python benchmarks/beta_rule.py [--points 100 250] [--kappa 4] [--tokens 200000] [--forms paper paper:keep]
        [--out DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tiny_runs import ADAM_HPARAMS, OFFLINE, run_train  # noqa: E402
from bigbatch.atomic import write_text  # noqa: E402

OPTIMIZERS = {
    "adamw": ["--optim.name", "adamw", "--optim.hparams", ADAM_HPARAMS],
    "adabound": [],  # configs/tiny.yaml's
    "radam": ["--optim.name", "radam", "--optim.hparams", ADAM_HPARAMS],
}
FORMS = ("paper", "power", "keep_beta1", "keep", "paper:keep")


def warm_run(out: Path, opt: str, points: list[int], tokens: int, threads: int | None, reuse: bool) -> None:
    """One train.py run that checkpoints at every step of ``points`` (and keeps them all); with
    ``reuse``, none when ``out`` holds them already."""
    if reuse and all((out / "checkpoints" / f"step{s:08d}").is_dir() for s in points):
        return
    every = math.gcd(*points)
    run_train(out, OPTIMIZERS[opt] + ["--batch.global_batch", "16", "--train.tokens", str(tokens),
                                      "--checkpoint.every_steps", str(every), "--checkpoint.keep", "100",
                                      "--train.eval_every", "0", "--checkpoint.at_end", "false"], 1, threads)


def start_at(run: Path, step: int, dest: Path) -> Path:
    """A copy of ``run`` whose only checkpoint is the one of ``step``."""
    tag = f"step{step:08d}"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run, dest, ignore=lambda d, names: [n for n in names if Path(d).name == "checkpoints"
                                                         and n.startswith("step") and n != tag])
    (dest / "checkpoints" / "latest").write_text(tag)
    return dest


def check_rules(start: Path, out: Path, branches: str, kappa: int, tokens: int, form: str,
                threads: int | None, reuse: bool) -> dict:
    """check-rules' result of each branch; with ``reuse``, those ``out`` holds already are not rerun.
    ``form``: a beta form, with ``:keep`` the second moment kept."""
    results = {b: out / "branches" / b / "result.json" for b in branches.split(",")}
    if reuse and all(r.is_file() for r in results.values()):
        return {b: json.loads(r.read_text()) for b, r in results.items()}
    beta_form, _, second_moment = form.partition(":")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "bigbatch.check_rules", "--from", str(start), "--kappas", f"1,{kappa}",
           "--tokens", str(tokens), "--evals", "2", "--out", str(out), "--branches", branches,
           "--batch.beta_form", beta_form, "--batch.second_moment", second_moment or "rescale",
           "--logging.progress", "none",
           *(["--train.threads", str(threads)] if threads else [])]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"check-rules failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {b: json.loads(r.read_text()) for b, r in results.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--points", type=int, nargs="+", default=[100, 250], help="starting steps (batch 16)")
    p.add_argument("--kappa", type=int, default=4)
    p.add_argument("--tokens", type=int, default=200_000, help="tokens each branch trains")
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--out", type=Path, default=REPO / "runs" / "beta_rule")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    p.add_argument("--reuse", action="store_true", help="keep the warm runs and branches OUT holds already")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = []
    for opt in args.optimizers:
        run = args.out / opt / "warm"
        warm_run(run, opt, args.points, (max(args.points) + 1) * 16 * 128, args.threads, args.reuse)
        for step in args.points:
            start = start_at(run, step, args.out / opt / f"start{step}")
            base = args.out / opt / f"step{step}"
            ref = check_rules(start, base / "k1", "k1,k1_seed2", args.kappa, args.tokens, "paper", args.threads,
                              args.reuse)
            k1 = ref["k1"]["final_loss"]
            seed_gap = abs(ref["k1_seed2"]["final_loss"] - k1) / k1
            tol = max(0.01, 2 * seed_gap)
            for form in args.forms:
                got = check_rules(start, base / form.replace(":", "_v"), f"k{args.kappa}", args.kappa, args.tokens,
                                  form, args.threads, args.reuse)
                loss = got[f"k{args.kappa}"]["final_loss"]
                row = {"optimizer": opt, "step": step, "tokens_at_start": step * 16 * 128, "form": form,
                       "kappa": args.kappa, "k1_loss": k1, "loss": loss, "gap": (loss - k1) / k1,
                       "seed_gap": seed_gap, "tolerance": tol}
                table.append(row)
                write_text(args.out / "beta_rule.json", json.dumps(table, indent=1))
                print(f"{opt:<9} step {step:>4} ({row['tokens_at_start']:>7,} tokens) {form:<11} k{args.kappa} "
                      f"{loss:.4f} vs k1 {k1:.4f}: {100 * row['gap']:+.2f}% (tolerance {100 * tol:.2f}%)", flush=True)
    print(f"\nbatch 16 -> {16 * args.kappa} (kappa {args.kappa}), {args.tokens:,} tokens per branch; gap of the eval "
          f"loss to k1 (negative: better)")
    print(f"{'optimizer':<9} {'tokens':>9} " + " ".join(f"{f:>11}" for f in args.forms))
    for opt in args.optimizers:
        for step in args.points:
            rows = {r["form"]: r for r in table if r["optimizer"] == opt and r["step"] == step}
            print(f"{opt:<9} {step * 16 * 128:>9,} " + " ".join(f"{100 * rows[f]['gap']:+10.2f}%" for f in args.forms))


if __name__ == "__main__":
    main()
