"""``bigbatch`` command line: ``launch`` workers here or in an allocation, ``submit`` to SLURM,
``env`` to print the detected topology, ``check-rules`` to measure where the scaling rules hold
(:mod:`bigbatch.check_rules`; it runs in this process, which any launcher may start),
``export`` a run's checkpoint as a Hugging Face model and ``eval`` one with lm-evaluation-harness,
``status`` of a run directory.

    bigbatch launch --nproc-per-node 2 train.py --config configs/tiny.yaml
    bigbatch submit --nodes 2 --gpus-per-node 4 --time 04:00:00 -- train.py --config c.yaml
    bigbatch submit --dry-run --nodes 2 --gpus-per-node 8 --template torchrun -- train.py
    bigbatch check-rules --config configs/tiny.yaml --kappas 1,2,4 --tokens 200000 --out runs/check
    bigbatch launch --nproc-per-node 2 -m bigbatch.check_rules --from runs/tiny ...
    bigbatch export runs/tiny --out models/tiny          # the run's checkpoint as a Hugging Face model
    bigbatch eval models/tiny --tasks hellaswag --limit 100   # lm-evaluation-harness on it
    bigbatch status runs/tiny                            # checkpoints, batch, last records, finished?
    bigbatch prepare-data --config data.yaml --out /data/prep --workers 8   # token shards (bigbatch.data)
    bigbatch plan --config configs/1.3b.yaml --nodes 4 --gpus-per-node 8 --gpu h100   # before you queue
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from bigbatch.cli_parser import ArgumentParser
from bigbatch.launcher.env import LauncherEnvError, Topology, detect_topology, free_port
from bigbatch.launcher.submit import (DEFAULT_EXIT_GRACE_S, MAX_NODES_ENV, SubmitConfig, SubmitError,
                                      add_submit_arguments, render_sbatch, strip_separator, submit, submit_config,
                                      train_out_dir)

__all__ = ["main", "launch_local", "worker_command"]

# Signals passed on to every worker: the scheduler's warnings and the user's Ctrl-C.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class LaunchError(ValueError):
    """Bad ``bigbatch launch`` options; the message names the option, the value and what is allowed."""


def worker_command(command: list[str], python: str = sys.executable) -> list[str]:
    """``train.py ...`` and ``-m pkg ...`` run with ``python``; anything else runs as is."""
    if not command:
        raise LaunchError("nothing to run; e.g. bigbatch launch train.py --config x.yaml")
    if command[0].endswith(".py") or command[0] == "-m":
        return [python, *command]
    return list(command)


def launch_local(command: list[str], nproc: int, *, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str = "127.0.0.1", master_port: int | None = None,
                 grace_s: float = DEFAULT_EXIT_GRACE_S) -> int:
    """Start ``nproc`` workers of ``command`` with the ``env://`` variables of node ``node_rank``
    of ``nnodes``; forward INT/TERM/USR1/USR2 to them; when one fails, TERM the rest (KILL after
    ``grace_s`` seconds). Returns the first non-zero exit status (a signal N gives 128+N), else 0.
    """
    if nproc < 1:
        raise LaunchError(f"--nproc-per-node: {nproc} must be >= 1")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank: {node_rank} must be in [0, --nnodes={nnodes})")
    if nnodes > 1 and master_port is None:
        raise LaunchError("--master-port: required with --nnodes > 1")
    port = master_port or free_port()
    world = nnodes * nproc
    procs: list[subprocess.Popen] = []
    for local_rank in range(nproc):
        topo = Topology(node_rank * nproc + local_rank, world, local_rank, nproc, node_rank, nnodes,
                        master_addr, port, "env")
        env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
        env.update(topo.env())
        procs.append(subprocess.Popen(command, env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
    status, deadline = 0, None
    try:
        while [p.poll() for p in procs].count(None):  # poll every worker, every time
            if status == 0:
                failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
                if failed:
                    status = failed[0]
                    for p in procs:
                        if p.poll() is None:
                            p.terminate()
                    deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return 128 - status if status < 0 else status


def _cmd_launch(args) -> int:
    command = worker_command(args.command, args.python)
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node: {args.nproc_per_node} must be >= 1")
    problem = train_command_problem(command, os.getcwd())
    if problem:
        raise LaunchError(problem)
    in_allocation = os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID") is None
    if in_allocation and not args.local:
        # Inside sbatch/salloc: srun starts the workers on every node of the allocation.
        srun = ["srun", f"--wait={args.exit_grace}"]
        if args.nproc_per_node:
            srun += [f"--ntasks-per-node={args.nproc_per_node}",
                     f"--nodes={os.environ.get('SLURM_NNODES', '1')}",
                     f"--ntasks={args.nproc_per_node * int(os.environ.get('SLURM_NNODES', '1'))}"]
        argv = srun + command
        print("[bigbatch] " + shlex.join(argv), file=sys.stderr, flush=True)
        return launch_exec(argv)
    nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
    return launch_local(command, nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                        master_addr=args.master_addr, master_port=args.master_port, grace_s=args.exit_grace)


def launch_exec(argv: list[str]) -> int:
    """Run ``argv`` as a child with signals forwarded; return its status."""
    proc = subprocess.Popen(argv)
    old = {s: signal.signal(s, lambda n, _f: proc.poll() is None and proc.send_signal(n)) for s in FORWARDED}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 - rc if rc < 0 else rc


#: ``bigbatch submit`` options whose defaults decide what the job gets; said once when not given
SUBMIT_DEFAULTS = ("--time", "--cpus-per-task", "--ntasks-per-node", "--nodes", "--gpus-per-node", "--template",
                   "--signal-seconds", "--output", "--chdir")


def _submit_notes(args, cfg: SubmitConfig) -> list[str]:
    """What a submission chose without being told: the defaults used and a rewritten --out."""
    given = {a.split("=", 1)[0] for a in getattr(args, "options", [])}
    shown = {"--time": cfg.time, "--cpus-per-task": cfg.cpus_per_task, "--nodes": cfg.nodes,
             "--gpus-per-node": cfg.gpus_per_node, "--template": cfg.template, "--output": cfg.output,
             "--ntasks-per-node": f"{cfg.workers_per_node} (one per GPU, else 1)",
             "--signal-seconds": f"{cfg.signal_seconds} (USR1 before the time limit)" if cfg.requeue else None,
             "--chdir": cfg.workdir}
    used = [f"{k} {shown[k]}" for k in SUBMIT_DEFAULTS if k not in given and shown[k] is not None]
    notes = [f"defaults used: {', '.join(used)}"] if used else []
    out = train_out_dir(cfg.command) if cfg.requeue else None
    if out:
        notes.append(f"train.py --out {out[1]} runs as given at the first start and as --resume {out[1]} on every "
                     "requeue (--out refuses a directory that holds a run)")
    return notes


def check_submission(cfg: SubmitConfig) -> None:
    """What would make the job fail on the cluster, refused now (SubmitError, one line): --chdir not a
    directory, --output's directory missing or not writable, and for train.py a command line it would
    refuse at start (bad config, --out holding a run, ...): it is resolved here, in --chdir."""
    from bigbatch.training.run_dir import dir_problem  # the training stack: see _cmd_check_rules

    if not os.path.isdir(cfg.workdir):
        raise SubmitError(f"--chdir: {cfg.workdir!r} is not a directory")
    out_dir = os.path.dirname(os.path.join(cfg.workdir, cfg.output)) or cfg.workdir
    if "%" not in out_dir:
        if not os.path.isdir(out_dir):
            raise SubmitError(f"--output: directory {out_dir!r} does not exist (SLURM would drop the job's log)")
        problem = dir_problem(out_dir)
        if problem:
            raise SubmitError(f"--output: directory {out_dir!r} {problem}")
    environ = {**os.environ, **cfg.env}  # sbatch exports this environment to the job
    if cfg.scales_out:
        environ[MAX_NODES_ENV] = str(cfg.max_nodes)
    problem = train_command_problem(cfg.command, cfg.workdir, nodes=cfg.nodes, per_node=cfg.workers_per_node,
                                    environ=environ)
    if problem:
        raise SubmitError(problem)


def train_command_problem(command: list[str], workdir: str, *, nodes: int | None = None, per_node: int = 1,
                          environ: dict | None = None) -> str | None:
    """Why train.py would refuse ``command`` (its arguments after ``train.py``) at start, resolved in
    ``workdir`` as it will be (bad config or value, --out holding a run or a file, ...), or None; for
    launchers to say it once, before starting anything. With ``nodes``: also train.py's checks of the
    batch, its schedule and the scale-out policy on ``nodes`` x ``per_node`` processes (with the
    job's ``environ``)."""
    from bigbatch.training.config import ConfigError  # the training stack: see _cmd_check_rules
    from bigbatch.training.run_dir import resolve_train_command

    where = ""
    try:
        resolved = resolve_train_command(command, workdir)
        if resolved is None:
            return None
        cfg, _, resuming = resolved
        if nodes is not None:
            from bigbatch.training.builders import check_batch
            from bigbatch.training.callbacks.scale_out import check_scale_out

            where = f" on {nodes} node(s) x {per_node} process(es)"
            check_batch(cfg, nodes * per_node)
            check_scale_out(cfg, nodes * per_node, per_node, fresh=not resuming,
                            environ=os.environ if environ is None else environ)
    except ConfigError as exc:
        return f"train.py would refuse this command at start{where}: {exc}"
    return None


def _cmd_submit(args) -> int:
    cfg = submit_config(args)
    cfg.validate()
    check_submission(cfg)
    from bigbatch.training.plan import submit_summary  # the training stack: see _cmd_check_rules

    summary = submit_summary(cfg.command, cfg.workdir, cfg.nodes, cfg.workers_per_node, cfg.gpus_per_node > 0)
    for note in _submit_notes(args, cfg) + ([summary] if summary else []):
        print(f"bigbatch submit: {note}", file=sys.stderr, flush=True)
    if args.dry_run:
        sys.stdout.write(render_sbatch(cfg))
        return 0
    print(submit(cfg, wait=args.wait), flush=True)
    return 0


def _cmd_env(args) -> int:
    topo = detect_topology(allow_mpi4py=args.mpi4py)
    if args.json:
        print(json.dumps({**topo.__dict__, "hosts": list(topo.hosts)}))
    else:
        for k, v in topo.env().items():
            print(f"export {k}={shlex.quote(v)}")
    return 0


# The training commands import torch, DeepSpeed and transformers (seconds): imported when one runs, so
# that `bigbatch launch`, `submit` and `env` start at once.
def _cmd_check_rules(args) -> int:
    from bigbatch.check_rules import main as check_rules_main

    return check_rules_main(args.args)


def _cmd_prepare_data(args) -> int:
    from bigbatch.data.prepare import main as prepare_main
    from bigbatch.training.config import load_config

    return prepare_main(args.args, load_config=load_config)

def _cmd_export(args) -> int:
    from bigbatch.training.export import main as export_main

    return export_main(args.args)


def _cmd_plan(args) -> int:
    from bigbatch.training.plan import main as plan_main

    return plan_main(args.args)


def _cmd_status(args) -> int:
    from bigbatch.training.status import main as status_main

    return status_main(args.args)


def _cmd_eval(args) -> int:
    from bigbatch.training.evaluate import main as eval_main

    return eval_main(args.args)


# subcommands that parse their own options, all of them (argparse would claim the first ones)
_OWN_PARSERS = {
    "check-rules": (_cmd_check_rules, "branch a run at larger batches (and SVAG) and report where the scaling rules hold"),
    "export": (_cmd_export, "write a run's checkpoint as a Hugging Face model directory"),
    "eval": (_cmd_eval, "lm-evaluation-harness on a Hugging Face model directory"),
    "plan": (_cmd_plan, "what a config needs and does on N nodes: memory per GPU, batch plan, schedule, cost"),
    "status": (_cmd_status, "a run directory on one screen: checkpoints, batch, last records, finished or running"),
    "prepare-data": (_cmd_prepare_data,
                     "tokenize the config's data sources once into token shards (restartable, SLURM arrays)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="bigbatch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    la = sub.add_parser("launch", help="start workers here (or with srun inside an allocation)")
    la.add_argument("--nproc-per-node", type=int, default=None,
                    help="workers per node (default: 1 here; the allocation's tasks under SLURM)")
    la.add_argument("--nnodes", type=int, default=1, help="nodes, for a static multi-node start")
    la.add_argument("--node-rank", type=int, default=0)
    la.add_argument("--master-addr", default="127.0.0.1")
    la.add_argument("--master-port", type=int, default=None, help="default: a free port (one node)")
    la.add_argument("--local", action="store_true", help="inside an allocation, still start workers here")
    la.add_argument("--exit-grace", type=int, default=DEFAULT_EXIT_GRACE_S,
                    help="seconds the other workers get once one has failed (then they are stopped)")
    la.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    la.add_argument("command", nargs=argparse.REMAINDER, help="train.py ARGS, -m MODULE ARGS or a program")
    la.set_defaults(func=_cmd_launch)

    su = sub.add_parser("submit", help="render an sbatch script from slurm/ and submit it")
    add_submit_arguments(su)
    su.add_argument("command", nargs=argparse.REMAINDER)
    su.set_defaults(func=_cmd_submit)

    for name, (func, text) in _OWN_PARSERS.items():
        own = sub.add_parser(name, add_help=False, help=text)
        own.add_argument("args", nargs=argparse.REMAINDER)
        own.set_defaults(func=func)

    en = sub.add_parser("env", help="print the detected topology")
    en.add_argument("--json", action="store_true")
    en.add_argument("--mpi4py", action="store_true", help="allow mpi4py discovery")
    en.set_defaults(func=_cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in _OWN_PARSERS:
        return _OWN_PARSERS[argv[0]][0](argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    strip_separator(args)
    args.options = argv[1:argv.index("--")] if "--" in argv else argv[1:]  # what the user gave
    try:
        return args.func(args)
    except (SubmitError, LauncherEnvError, LaunchError) as exc:
        print(f"bigbatch {args.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
