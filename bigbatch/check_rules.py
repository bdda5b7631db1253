"""``bigbatch check-rules``: measure, on the user's own model and at a given point of training,
up to which batch the scaling rules hold (branched runs) and whether the SDE behind them does (SVAG).

    bigbatch check-rules --config configs/tiny.yaml --kappas 1,2,4,8 --tokens 200000 --out DIR
    bigbatch check-rules --from runs/tiny --kappas 1,2,4 --tokens 200000 --svag 2,4 --out DIR
    torchrun --nproc_per_node 2 -m bigbatch.check_rules --from runs/tiny ...   # any launcher
    bigbatch check-rules --from runs/125m ... --submit '--nodes 2 --gpus-per-node 8 --time 02:00:00'

From one starting point (the newest good checkpoint of ``--from RUN_DIR``, or the initialisation
of ``--config``) every *branch* trains ``--tokens`` more tokens on the same data stream, one branch
after another in this process group, and is evaluated on the same held-out blocks at the same
token counts (``--evals`` points):

* ``k1``: the starting batch ``B0`` (the checkpoint's, or the config's) and hyperparameters;
  ``k1_seed2``: the same with another data order, the seed-to-seed noise;
* ``k<kappa>``: batch ``kappa * B0`` with the optimizer's scaling rule applied (lr, betas, eps,
  AdaBound's bounds, weight decay; ``tokens / batch`` steps); with ``--without-rules`` also
  ``k<kappa>_norule``: the larger batch with the starting hyperparameters;
* ``svag<l>``: batch ``B0`` with the SVAG gradient transform of :mod:`bigbatch.scaling.svag`
  (noise amplified ``l`` times, the rule at ``kappa = 1 / l``, ``l`` times the tokens; compared at
  tokens / l, its SDE time). ``svag1`` is ``k1``.

Branches keep the run's lr schedule (in tokens; SVAG branches read it at tokens / l). A kappa
*holds* when its eval loss ends within the tolerance of ``k1``'s: ``max(--tolerance, 2 x the
seed-to-seed gap)`` (relative). The largest batch up to which every kappa holds is the measured
critical batch at the starting point, printed next to the gradient noise scale there. The SDE
approximation holds when ``k1`` ends within the tolerance of every ``svag<l>``.

Branches run one after another on the current allocation; with ``--submit OPTIONS`` each is a
SLURM job of its own (``bigbatch submit OPTIONS``, running this command with ``--branches NAME``,
which writes ``branches/NAME/result.json``) and a one-task job after the last (``afterany``) writes
the report (``--report-only``).

Outputs in ``--out``: ``report.json`` (per branch: tokens, steps, eval losses, gap, verdict),
``report.md`` (tables and verdicts), ``eval_loss.png`` (eval loss against tokens, one line per
branch), ``branches/<name>/`` (each branch's metrics.jsonl and resolved config).
Exit codes: 0 done (whatever the verdicts), 2 bad input.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field

from bigbatch import distributed as bbdist
from bigbatch.atomic import write_text
from bigbatch.cli_parser import ArgumentParser, command_main
from bigbatch.launcher.submit import SubmitError, parse_submit, render_sbatch, submit, submit_config
from bigbatch.scaling.noise_scale import GradientNoiseScale
from bigbatch.scaling.svag import check_l, micro_weights
from bigbatch.sharding import tags
from bigbatch.training.builders import make_plan, setup
from bigbatch.training.callbacks import Callback, Evaluation, default_callbacks
from bigbatch.training.config import ConfigError, RunConfig, apply_overrides, load_config, parse_overrides
from bigbatch.data.run_data import load_run_data
from bigbatch.training.loop import Trainer
from bigbatch.training.metrics import pyplot, save_png
from bigbatch.training.run_dir import out_problem, prepare, saved_config

REPORT_JSON, REPORT_MD, PLOT = "report.json", "report.md", "eval_loss.png"


@dataclass
class Branch:
    """One branch: batch ``kappa * B0``, scaling rule applied or not, SVAG amplification ``l``,
    data order ``data_seed``."""

    name: str
    kappa: float = 1.0
    l: float = 1.0
    data_seed: int = 0
    rules: bool = True


@dataclass
class Start:
    """The starting point: ``checkpoint`` (a checkpoint directory, None: initialisation), its
    tokens, step and global batch ``B0``, and the noise scale measured there (samples, or None)."""

    checkpoint: str | None
    tag: str | None
    tokens: int
    step: int
    global_batch: int
    noise_scale: float | None


@dataclass
class BranchResult:
    name: str
    kappa: float
    l: float
    rules: bool
    global_batch: int
    data_seed: int
    steps: int = 0
    tokens: int = 0  # read by the branch (l x the budget for SVAG)
    evals: list = field(default_factory=list)  # [sde_tokens since the start, eval loss]
    final_loss: float = math.nan
    noise_scale: float | None = None  # B_noise at the branch's end (measured in k1)
    gap: float | None = None  # relative to k1 (SVAG: k1 relative to this branch)
    max_gap: float | None = None  # the largest |gap| along the way
    verdict: str | None = None  # holds | breaks (None: k1 itself, the seed branch, no-rule branches)


def parse_list(text: str, what: str, cast=float) -> list:
    try:
        values = [cast(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: {text!r} must be a comma-separated list of numbers, e.g. 1,2,4") from None
    if not values:
        raise ConfigError(f"{what}: {text!r} is empty")
    return values


def parse_args(argv):
    p = ArgumentParser(prog="bigbatch check-rules", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML (default with --from: that run's resolved config)")
    p.add_argument("--from", dest="source", metavar="RUN_DIR",
                   help="start from the newest good checkpoint of this run (default: initialisation)")
    p.add_argument("--kappas", default="1,2,4,8", help="batch multiples of the starting batch B0 (1 is always run)")
    p.add_argument("--tokens", type=int, required=True, help="tokens each branch trains (SVAG: x l)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--svag", default="", help="SVAG amplifications l >= 1, e.g. 2,4 (default: none)")
    p.add_argument("--evals", type=int, default=4, help="evaluations along each branch (>= 1)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="relative eval-loss gap that still holds (raised to 2 x the seed-to-seed gap)")
    p.add_argument("--without-rules", action="store_true",
                   help="also run each kappa > 1 with the starting hyperparameters (no rule)")
    p.add_argument("--submit", metavar="OPTIONS",
                   help="submit each branch as a SLURM job with these `bigbatch submit` options (quoted, e.g. "
                        "'--nodes 2 --gpus-per-node 8 --time 02:00:00'), and a report job after the last")
    p.add_argument("--branches", help="run only these branches (comma-separated names; what --submit's jobs run)")
    p.add_argument("--report-only", action="store_true", help="write the report from the branches' results")
    args, rest = p.parse_known_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args, parse_overrides(rest)


def load_run_config(args, overrides) -> RunConfig:
    """--config (or --from's resolved config) with the overrides."""
    if args.config:
        return load_config(args.config, overrides)
    if not args.source:
        raise ConfigError("--config: required unless --from RUN_DIR is given")
    return saved_config(args.source, overrides, "--from")


def find_start(cfg: RunConfig, source: str | None, world_size: int) -> Start:
    """The starting point: the newest checkpoint of ``source`` that verifies (its meta names the batch,
    tokens and noise scale; every branch loads exactly this tag), or the initialisation at the
    config's batch on this world size."""
    if source is None:
        return Start(None, None, 0, 0, make_plan(cfg, world_size).global_batch, None)

    ckpt = os.path.join(source, "checkpoints")
    good, refused = tags.candidates(ckpt)
    if not good:
        why = "; ".join(f"{t}: {w}" for t, w in refused) or "none saved"
        raise ConfigError(f"--from: {os.path.abspath(ckpt)} has no complete checkpoint ({why}); train with "
                          "checkpoint.every_steps or checkpoint.at_end first, or omit --from to start from "
                          "initialisation")
    for tag in good:  # the tag every branch loads: the first that verifies (sizes and content hashes)
        try:
            tags.verify_tag_together(ckpt, tag)
            break
        except tags.UnsafeCheckpoint as exc:  # planted to run code: refused, not passed over
            raise ConfigError(f"--from: {exc}") from None
        except tags.CheckpointError as exc:
            refused.append((tag, str(exc)))
    else:
        raise ConfigError(f"--from: no checkpoint in {os.path.abspath(ckpt)} can be loaded: "
                          + "; ".join(f"{t}: {w}" for t, w in refused))
    if refused:
        print(f"check-rules: starting from {tag}; passed over: " + "; ".join(f"{t}: {w}" for t, w in refused),
              flush=True)
    try:
        meta = tags.read_meta(ckpt, tag)
    except tags.CheckpointError as exc:
        raise ConfigError(f"--from: {exc}") from None
    client = meta.get("client_state") or {}
    noise = None
    if client.get("noise_scale"):
        est = GradientNoiseScale()
        est.load_state_dict(client["noise_scale"])
        noise = est.b_noise
    return Start(ckpt, tag, int(client.get("tokens", 0)), int(client.get("step", 0)),
                 int(client.get("global_batch") or meta["global_batch"]), noise)


def branches_for(kappas: list[float], svag: list[float], without_rules: bool, seed: int) -> list[Branch]:
    out = [Branch("k1", 1.0, data_seed=seed), Branch("k1_seed2", 1.0, data_seed=seed + 1)]
    out += [Branch(f"k{k:g}", k, data_seed=seed) for k in kappas if k != 1]
    if without_rules:
        out += [Branch(f"k{k:g}_norule", k, data_seed=seed, rules=False) for k in kappas if k != 1]
    out += [Branch(f"svag{l:g}", 1.0, l=l, data_seed=seed) for l in svag if l != 1]
    return out


def plan_branches(args, cfg: RunConfig, start: Start, seq_len: int) -> tuple[list[Branch], int, int]:
    """Branches, tokens per branch and tokens between evaluations, aligned so that every branch
    evaluates at the same token counts; ConfigError naming the argument for a bad one."""
    kappas = parse_list(args.kappas, "--kappas")
    for k in kappas:
        if not k > 0 or not float(k * start.global_batch).is_integer():
            raise ConfigError(f"--kappas: {k:g} x the starting batch {start.global_batch} is not a whole number of "
                              "sequences; use kappas k with k x B0 an integer >= 1")
    svag = parse_list(args.svag, "--svag") if args.svag else []
    for l in svag:
        try:
            check_l(l)
        except ValueError as exc:
            raise ConfigError(f"--svag: {exc}") from None
    if args.evals < 1:
        raise ConfigError(f"--evals: {args.evals} must be >= 1")
    if not 0 <= args.tolerance < 1:
        raise ConfigError(f"--tolerance: {args.tolerance} must be in [0, 1) (a relative eval-loss gap)")
    branches = branches_for(kappas, svag, args.without_rules, cfg.train.seed)
    unit = int(max(b.kappa for b in branches) * start.global_batch) * seq_len  # one step of the largest batch
    if args.tokens < unit:
        raise ConfigError(f"--tokens: {args.tokens} is shorter than one step at the largest batch "
                          f"({int(unit / seq_len)} sequences x {seq_len} tokens = {unit} tokens)")
    evals = min(args.evals, args.tokens // unit)
    every = (args.tokens // evals) // unit * unit
    if args.branches:
        names = [b.strip() for b in args.branches.split(",") if b.strip()]
        unknown = sorted(set(names) - {b.name for b in branches})
        if unknown:
            raise ConfigError(f"--branches: {unknown} are not branches of this check ({[b.name for b in branches]})")
        branches = [b for b in branches if b.name in names]
    return branches, every * evals, every


def svag_micro_sizes(cfg: RunConfig, world_size: int, batch: int) -> list[int] | None:
    """``batch.micro_batch_sizes`` for a SVAG branch at global ``batch`` on ``world_size`` processes, whose
    steps must have an even number of micro batches (two equal halves): the config's when its plan
    has one, else the largest micro batch (of the config's sizes, then halvings of the plan's) that
    gives one; None when none does."""
    plan = make_plan(cfg, world_size, batch)
    if world_size * plan.grad_accum % 2 == 0:
        return list(cfg.batch.micro_batch_sizes)
    halvings = [plan.micro_batch >> k for k in range(1, plan.micro_batch.bit_length())]
    for m in sorted({*cfg.batch.micro_batch_sizes, *halvings}, reverse=True):
        if m >= plan.micro_batch:
            continue
        c = copy.deepcopy(cfg)
        c.batch.micro_batch_sizes = [m]
        try:
            if world_size * make_plan(c, world_size, batch).grad_accum % 2 == 0:
                return [m]
        except ConfigError:
            continue
    return None


def check_reachable(cfg: RunConfig, branches: list[Branch], start: Start, world_size: int) -> None:
    """Every branch's batch must be reachable on ``world_size`` (and split into two equal halves for
    SVAG, :func:`svag_micro_sizes`): ConfigError naming --kappas or --svag."""
    for b in branches:
        batch = int(b.kappa * start.global_batch)
        try:
            plan = make_plan(cfg, world_size, batch)
        except ConfigError as exc:
            raise ConfigError(f"--kappas: kappa {b.kappa:g} (global batch {batch} on {world_size} process(es)) cannot "
                              f"be run: {exc}") from None
        if b.l != 1 and svag_micro_sizes(cfg, world_size, batch) is None:
            raise ConfigError(f"--svag: l={b.l:g} at global batch {batch} on {world_size} process(es): no micro batch "
                              f"(batch.micro_batch_sizes {list(cfg.batch.micro_batch_sizes)} or a halving of "
                              f"{plan.micro_batch}) gives a step an even number of micro batches (two equal halves); "
                              "run on an even number of processes or at an even global batch")


class BranchRun(Callback):
    """What makes a :class:`~bigbatch.training.loop.Trainer` run one branch: it stops ``l x tokens``
    after the start, reads the lr schedule at SDE time (``start + (tokens - start) / l``), for SVAG
    moves the hyperparameters to the rule at kappa = 1 / l and weights the micro-batch losses, and
    keeps each evaluation as ``[SDE tokens since the start, eval loss]``. Its evaluations come from
    :func:`branch_callbacks`."""

    def __init__(self, branch: Branch, tokens: int):
        self.branch, self.tokens = branch, tokens
        self.origin = self.origin_step = 0
        self.evals: list[list[float]] = []

    def on_restore(self, trainer) -> None:
        l = self.branch.l
        self.origin, self.origin_step = trainer.tokens, trainer.step
        trainer.set_budget(self.origin + int(l * self.tokens), None)
        trainer.set_lr_clock(lambda tokens: self.origin + (tokens - self.origin) / l)
        if l != 1:
            trainer.rescale(1 / l)
            trainer.set_loss_weights(micro_weights(l, rank=trainer.info.rank, world_size=trainer.info.world_size,
                                                   grad_accum=trainer.plan.grad_accum))

    def post_eval(self, trainer, record: dict) -> None:
        self.evals.append([(trainer.tokens - self.origin) / self.branch.l, record["eval_loss"]])


def branch_callbacks(cfg: RunConfig, branch: Branch, tokens: int, eval_every: int) -> tuple[BranchRun, list]:
    """The branch's :class:`BranchRun` and the callbacks of its run: train.py's, evaluating at the
    start and every ``l x eval_every`` tokens after it."""
    run = BranchRun(branch, tokens)
    evaluation = Evaluation(every_tokens=int(branch.l * eval_every), at_start=True)
    return run, [*default_callbacks(cfg, evaluation=evaluation), run]


def branch_config(cfg: RunConfig, branch: Branch, start: Start, world_size: int = 1) -> RunConfig:
    """The branch's run config: no checkpoints or plot; no noise scale under SVAG (its micro-batch
    gradients are weighted) and micro batches that split a step into two equal halves on
    ``world_size`` processes; without the rule, the branch's batch is its own reference."""
    c = copy.deepcopy(cfg)
    pairs = [("checkpoint.every_steps", "0"), ("checkpoint.at_end", "false"), ("logging.plot", "false"),
             ("logging.tensorboard", "false"), ("train.eval_every", "0")]
    if branch.l != 1:
        pairs.append(("train.noise_scale_every", "0"))
        sizes = svag_micro_sizes(cfg, world_size, int(branch.kappa * start.global_batch))
        if sizes is not None and sizes != list(cfg.batch.micro_batch_sizes):
            pairs.append(("batch.micro_batch_sizes", str(sizes)))
    if not branch.rules and start.checkpoint is None:
        pairs.append(("batch.reference_global_batch", str(int(branch.kappa * start.global_batch))))
    return apply_overrides(c, pairs)


def run_branch(cfg, out, info, tok, data, corpus, branch: Branch, start: Start, tokens: int,
               eval_every: int) -> BranchResult:
    bcfg = branch_config(cfg, branch, start, info.world_size)
    bdir = os.path.join(out, "branches", branch.name)
    prepare(bcfg, bdir, info, overwrite=True, resuming=False)
    batch = int(branch.kappa * start.global_batch)
    run = setup(bcfg, info.world_size, tok, data.seq_len, global_batch=batch)
    recorder, callbacks = branch_callbacks(bcfg, branch, tokens, eval_every)
    trainer = Trainer(bcfg, bdir, info, data, corpus, run, callbacks=callbacks, resume_from=start.checkpoint,
                      resume_tag=start.tag, data_seed=branch.data_seed, apply_rules=branch.rules)
    code = trainer.run()
    if code != 0:
        raise SystemExit(code)
    res = BranchResult(branch.name, branch.kappa, branch.l, branch.rules, batch, branch.data_seed,
                       steps=trainer.step - recorder.origin_step, tokens=trainer.tokens - recorder.origin,
                       evals=recorder.evals, final_loss=recorder.evals[-1][1], noise_scale=trainer.noise.b_noise)
    del trainer, run
    gc.collect()
    return res


def judge(results: list[BranchResult], tolerance: float) -> dict:
    """Gaps and verdicts in place; returns the summary (tolerance, seed gap, critical batch)."""
    by = {r.name: r for r in results}
    ref = by["k1"]
    seed_gap = abs(by["k1_seed2"].final_loss - ref.final_loss) / ref.final_loss
    tol = max(tolerance, 2 * seed_gap)

    def gaps(a: BranchResult, b: BranchResult) -> tuple[float, float]:
        """(final gap of a over b, largest |gap| along the way), relative to b; the eval points agree."""
        along = [abs(x[1] - y[1]) / y[1] for x, y in zip(a.evals, b.evals)]
        return (a.final_loss - b.final_loss) / b.final_loss, max(along)

    for r in results:
        if r.name in ("k1", "k1_seed2"):
            r.gap, r.max_gap = gaps(r, ref) if r.name != "k1" else (0.0, 0.0)
        elif r.l != 1:  # SVAG: the plain run against the amplified one
            r.gap, r.max_gap = gaps(ref, r)
            r.verdict = "holds" if abs(r.gap) <= tol else "breaks"
        else:
            r.gap, r.max_gap = gaps(r, ref)
            # Only a loss that is worse breaks the rule; a branch that ends better still kept up.
            r.verdict = "holds" if r.gap <= tol else "breaks"
    critical, every_kappa_held = ref.global_batch, True
    for r in sorted((r for r in results if r.rules and r.l == 1 and r.kappa > 1), key=lambda r: r.kappa):
        if r.verdict != "holds":
            every_kappa_held = False
            break
        critical = r.global_batch
    svag = [r for r in results if r.l != 1]
    # when the largest kappa held too, the critical batch lies at or beyond it: a lower bound
    return {"tolerance": tol, "tolerance_floor": tolerance, "seed_gap": seed_gap, "critical_batch": critical,
            "critical_batch_is_lower_bound": every_kappa_held,
            "sde_holds": all(r.verdict == "holds" for r in svag) if svag else None}


def plot(results: list[BranchResult], path: str, title: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for r in results:
        style = "--" if (not r.rules or r.name == "k1_seed2") else (":" if r.l != 1 else "-")
        ax.plot([e[0] for e in r.evals], [e[1] for e in r.evals], style, marker="o", ms=3,
                label=f"{r.name} (batch {r.global_batch}, {r.steps} steps)")
    ax.set_xlabel("tokens since the start (SVAG: tokens / l)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path, dpi=110)


def markdown(report: dict) -> str:
    s, start = report["summary"], report["start"]
    noise = f"{start['noise_scale']:.1f}" if start["noise_scale"] is not None else "not measured"
    lines = [f"# check-rules: {report['optimizer']} from {start['tag'] or 'initialisation'} "
             f"({start['tokens']:,} tokens, batch B0 = {start['global_batch']})", "",
             f"Each branch: {report['tokens']:,} tokens (SVAG: x l), evaluated every {report['eval_every']:,} tokens on "
             f"{report['eval_blocks']} held-out blocks. Tolerance {s['tolerance']:.2%} (floor {s['tolerance_floor']:.2%}, "
             f"2 x the seed-to-seed gap {s['seed_gap']:.2%}).", "",
             "| branch | batch | rule | steps | final eval loss | gap to k1 | largest gap on the way | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["branches"]:
        rule = "SVAG l=%g" % r["l"] if r["l"] != 1 else ("yes" if r["rules"] else "no")
        lines.append(f"| {r['name']} | {r['global_batch']} | {rule} | {r['steps']} | {r['final_loss']:.4f} | "
                     f"{r['gap']:+.2%} | {r['max_gap']:.2%} | {r['verdict'] or '-'} |")
    b_end = next(r["noise_scale"] for r in report["branches"] if r["name"] == "k1")
    bound = s.get("critical_batch_is_lower_bound")
    lines += ["", f"**Measured critical batch: {'at least ' if bound else ''}{s['critical_batch']}** (the largest kappa "
              f"x B0 up to which every kappa holds{'; every kappa held, so it may lie beyond' if bound else ''}). "
              f"Gradient noise scale B_noise at the start: {noise}; at the end of k1: "
              + (f"{b_end:.1f}." if b_end is not None else "not measured.")]
    if s["sde_holds"] is not None:
        lines.append(f"SDE approximation (SVAG): {'holds' if s['sde_holds'] else 'breaks'} (k1 against every l >= 2; "
                     "for SVAG rows the gap is k1's relative to the branch).")
    lines += ["", f"![eval loss]({PLOT})", ""]
    return "\n".join(lines)


RESULT = "result.json"  # a branch's BranchResult, in branches/<name>/


def check_rules(args, overrides) -> dict | None:
    """Run the branches (collective) and write the report on rank 0; or, with ``--submit``, submit
    them as SLURM jobs; or, with ``--report-only``, report the results they wrote. Returns the
    report (None when it is not written by this call)."""
    cfg = load_run_config(args, overrides)
    problem = out_problem(args.out)  # before any work, writing nothing
    if problem:
        raise ConfigError(f"--out: {os.path.abspath(args.out)}: {problem}")
    if args.submit:
        return submit_branches(args, cfg)
    if args.report_only:
        start = find_start(cfg, args.source, 1)
        branches, tokens, eval_every = plan_branches(args, cfg, start, cfg.data.seq_len)
        return write_report(args, cfg, start, collect(args.out, branches), tokens, eval_every, world_size=None)

    info = bbdist.init_training_process(cfg.train.threads, timeout_s=cfg.train.collective_timeout_s)
    tok, data, corpus = load_run_data(cfg, info)
    start = find_start(cfg, args.source, info.world_size)
    branches, tokens, eval_every = plan_branches(args, cfg, start, data.seq_len)
    check_reachable(cfg, branches, start, info.world_size)
    if info.is_main:
        os.makedirs(args.out, exist_ok=True)
        print(f"check-rules: {len(branches)} branches of {tokens:,} tokens from "
              f"{start.tag or 'initialisation'} (B0 = {start.global_batch}): {[b.name for b in branches]}", flush=True)
        if tokens != args.tokens:
            print(f"check-rules: --tokens {args.tokens:,} -> {tokens:,} tokens per branch: {tokens // eval_every} "
                  f"evaluation(s) every {eval_every:,} tokens, a whole number of steps at the largest batch",
                  flush=True)
    results = []
    for b in branches:
        r = run_branch(cfg, args.out, info, tok, data, corpus, b, start, tokens, eval_every)
        results.append(r)
        if info.is_main:
            write_text(os.path.join(args.out, "branches", b.name, RESULT), json.dumps(asdict(r)))
            print(f"check-rules: {b.name}: batch {r.global_batch}, {r.steps} steps, final eval loss "
                  f"{r.final_loss:.4f}", flush=True)
    report = None
    if not args.branches and info.is_main:
        report = write_report(args, cfg, start, results, tokens, eval_every, world_size=info.world_size)
    bbdist.barrier()
    return report


def collect(out: str, branches: list[Branch]) -> list[BranchResult]:
    """The results the branches' jobs wrote; ConfigError naming the missing ones."""
    found, missing = [], []
    for b in branches:
        path = os.path.join(out, "branches", b.name, RESULT)
        if not os.path.isfile(path):
            missing.append(b.name)
            continue
        with open(path) as fh:
            found.append(BranchResult(**json.load(fh)))
    if missing:
        raise ConfigError(f"--report-only: no result for branches {missing} in {os.path.abspath(out)}/branches "
                          "(their jobs failed or have not finished; see their logs)")
    return found


def write_report(args, cfg, start: Start, results: list[BranchResult], tokens: int, eval_every: int, *,
                 world_size: int | None) -> dict:
    summary = judge(results, args.tolerance)
    report = {"optimizer": cfg.optim.name, "start": asdict(start), "tokens": tokens, "eval_every": eval_every,
              "eval_blocks": cfg.train.eval_blocks, "world_size": world_size, "seq_len": cfg.data.seq_len,
              "summary": summary, "branches": [asdict(r) for r in results]}
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, REPORT_JSON), json.dumps(report, indent=1))
    plot(results, os.path.join(args.out, PLOT), f"{cfg.optim.name}: branches from {start.tag or 'init'}")
    write_text(os.path.join(args.out, REPORT_MD), markdown(report))
    print(markdown(report).split("![")[0], flush=True)
    return report


def _without(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def submit_branches(args, cfg: RunConfig) -> None:
    """One SLURM job per branch (``bigbatch submit`` with ``--submit``'s options, running this
    command with ``--branches NAME``), then a one-task report job that runs ``--report-only`` once
    every branch job has ended (``afterany``: a failed branch is named in the report job's error)."""

    options = shlex.split(args.submit)
    base = ["-m", "bigbatch.check_rules", *_without(_without(args.argv, "--submit"), "--branches")]
    probe = parse_submit(options, base)
    world = probe.nodes * (probe.ntasks_per_node or probe.gpus_per_node or 1)
    start = find_start(cfg, args.source, world)
    branches, tokens, _ = plan_branches(args, cfg, start, cfg.data.seq_len)
    check_reachable(cfg, branches, start, world)
    jobs = []
    try:
        for b in branches:
            sub = submit_config(parse_submit([*options, "--job-name", f"check-rules-{b.name}"],
                                             [*base, "--branches", b.name]))
            if probe.dry_run:
                sys.stdout.write(render_sbatch(sub))
                continue
            jobs.append(submit(sub))
            print(f"check-rules: branch {b.name}: job {jobs[-1]}", flush=True)
        report = submit_config(parse_submit(
            [*options, "--nodes", "1", "--ntasks-per-node", "1", "--gpus-per-node", "0", "--no-requeue",
             "--job-name", "check-rules-report",
             *([f"--sbatch-arg=--dependency=afterany:{':'.join(jobs)}"] if jobs else [])],
            [*base, "--report-only"]))
        if probe.dry_run:
            sys.stdout.write(render_sbatch(report))
            return None
        job = submit(report)
    except SubmitError as exc:
        raise ConfigError(f"--submit: {exc} (jobs submitted so far: {jobs or 'none'})") from None
    print(f"check-rules: report job {job} runs after {', '.join(jobs)}; it writes "
          f"{os.path.join(os.path.abspath(args.out), REPORT_MD)}", flush=True)
    return None


def main(argv=None) -> int:
    def body() -> int:
        check_rules(*parse_args(argv))
        return 0

    return command_main(body, teardown=bbdist.destroy)


if __name__ == "__main__":
    sys.exit(main())
