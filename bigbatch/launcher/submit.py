"""Render an sbatch script from a template in ``slurm/`` and submit it.

Templates hold ``{{name}}`` fields (bash keeps its own ``$VAR``); every field must be filled and
no unknown field may remain, so a typo fails at render time, not on the cluster.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bigbatch import exit_codes
from bigbatch.cli_parser import ArgumentParser
from bigbatch.launcher.env import LAUNCHER_VARS, SLURM_PORT_BASE, SLURM_PORT_SPAN

__all__ = ["SubmitConfig", "SubmitError", "render_sbatch", "submit", "TEMPLATES", "template_dir"]

TEMPLATES = ("srun", "torchrun")
_FIELD = re.compile(r"\{\{(\w+)\}\}")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^UNLIMITED$|^INFINITE$")
#: seconds the other workers get once one has exited (srun --wait; bigbatch launch)
DEFAULT_EXIT_GRACE_S = 60
#: the job's node limit for the scale-out policy (bigbatch.training.callbacks.scale_out reads it)
MAX_NODES_ENV = "BIGBATCH_MAX_NODES"


class SubmitError(ValueError):
    """Bad submission options; the message names the option, the value and what is allowed."""


def template_dir() -> Path:
    """``slurm/`` of the repository (``BIGBATCH_SLURM_TEMPLATES`` overrides)."""
    override = os.environ.get("BIGBATCH_SLURM_TEMPLATES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "slurm"


@dataclass
class SubmitConfig:
    """One sbatch submission.

    ``gpus_per_node``: GPUs asked for per node (0 on CPU clusters); one worker per GPU, or
    ``tasks_per_node`` workers when given. ``signal_seconds``: USR1 this many seconds before the
    time limit. ``command``: the worker command (``train.py --x 1``; a ``.py`` file runs with
    ``python``).
    """

    command: list[str]
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int = 1
    template: str = "srun"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    job_name: str = "bigbatch"
    output: str = "slurm-%j.out"
    workdir: str = field(default_factory=os.getcwd)
    signal_seconds: int = 120
    requeue: bool = True
    preempt_exit_code: int = exit_codes.PREEMPTED
    exit_grace: int = DEFAULT_EXIT_GRACE_S
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    sbatch_args: list[str] = field(default_factory=list)  # extra "#SBATCH" options, verbatim
    srun_args: list[str] = field(default_factory=list)  # extra srun options, e.g. --mpi=pmix
    max_nodes: int | None = None  # scale-out: on exit code SCALE_OUT, resubmit on up to this many nodes

    @property
    def scales_out(self) -> bool:
        """Whether the job resubmits itself on more nodes when the run exits with SCALE_OUT."""
        return self.max_nodes is not None and self.max_nodes > self.nodes

    def validate(self) -> "SubmitConfig":
        if self.template not in TEMPLATES:
            raise SubmitError(f"--template: {self.template!r} is not one of {list(TEMPLATES)}")
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise SubmitError(f"--{name.replace('_', '-')}: {getattr(self, name)} must be >= 1")
        if self.gpus_per_node < 0:
            raise SubmitError(f"--gpus-per-node: {self.gpus_per_node} must be >= 0")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise SubmitError(f"--ntasks-per-node: {self.tasks_per_node} must be >= 1")
        if not _TIME.match(self.time):
            raise SubmitError(f"--time: {self.time!r} is not a SLURM time (MM, HH:MM:SS, D-HH:MM, ...)")
        if not 0 <= self.signal_seconds <= 65535:
            raise SubmitError(f"--signal-seconds: {self.signal_seconds} must be in [0, 65535]")
        if not 1 <= self.exit_grace <= 65535:
            raise SubmitError(f"--exit-grace: {self.exit_grace} must be in [1, 65535] seconds")
        if not 1 <= self.preempt_exit_code <= 255:
            raise SubmitError(f"--preempt-exit-code: {self.preempt_exit_code} must be in 1..255")
        if self.max_nodes is not None:  # scale-out
            if self.max_nodes < self.nodes:
                raise SubmitError(f"--max-nodes: {self.max_nodes} is below --nodes {self.nodes}; give a node "
                                  "count >= --nodes (the largest allocation the run may move to)")
            if self.max_nodes > self.nodes and self.template != "srun":
                raise SubmitError(f"--max-nodes: {self.max_nodes} needs --template srun, not {self.template!r} "
                                  "(torchrun reports its workers' exit code as 1, hiding the scale-out code)")
        if not self.command:
            raise SubmitError("command: nothing to run; give it after `--`, e.g. -- train.py --config x.yaml")
        for key in self.env:
            if not re.fullmatch(r"[A-Za-z_]\w*", key):
                raise SubmitError(f"--env: {key!r} is not a variable name")
        for text in (self.job_name, self.output, self.workdir, *self.sbatch_args):
            if "\n" in text:
                raise SubmitError(f"{text!r}: newlines are not allowed in sbatch options")
        return self

    @property
    def workers_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


def _worker_argv(cfg: SubmitConfig) -> list[str]:
    cmd = list(cfg.command)
    if cmd[0].endswith(".py") or cmd[0] == "-m":
        cmd = [cfg.python, *cmd]
    return cmd


_RUN_DIR_OPT = "@@bigbatch_run_dir_opt@@"  # stands for "$run_dir_opt" until the command is quoted


def train_out_dir(command: list[str]) -> tuple[int, str] | None:
    """``(index of --out, DIR)`` when ``command`` runs train.py with ``--out DIR`` and no ``--resume``:
    such a command refuses, on a requeue, the run its first start created."""
    starts = [i for i, a in enumerate(command) if os.path.basename(a) == "train.py"]
    if not starts:
        return None
    args = command[starts[0] + 1:]
    if any(a == "--resume" or a.startswith("--resume=") for a in args):
        return None
    for j, a in enumerate(args):
        if a == "--out" and j + 1 < len(args):
            return starts[0] + 1 + j, args[j + 1]
        if a.startswith("--out="):
            return starts[0] + 1 + j, a.split("=", 1)[1]
    return None


def _requeue_safe(cfg: SubmitConfig, argv: list[str]) -> tuple[list[str], str]:
    """``argv`` with train.py's ``--out`` made ``"$run_dir_opt"``, and the lines that set it: ``--out`` on
    the first start (it still refuses a directory that holds another run), ``--resume`` on every
    requeue (SLURM_RESTART_COUNT > 0) and in the job a scale-out submits (BIGBATCH_CONTINUES), which
    continue the run the first start created."""
    found = train_out_dir(argv) if cfg.requeue or cfg.scales_out else None
    if found is None:
        return argv, ""
    j, out = found
    argv = [*argv[:j], _RUN_DIR_OPT, out, *argv[j + (1 if argv[j] == "--out" else 0) + 1:]]
    lines = ("# train.py --out refuses a directory that holds a run: every requeue, and the job a scale-out\n"
             "# submits, continue it with --resume.\n"
             'run_dir_opt=--out\nif [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || [ -n "${BIGBATCH_CONTINUES:-}" ]; then '
             'run_dir_opt=--resume; fi')
    return argv, lines


def _shell_join(argv: list[str]) -> str:
    return shlex.join(argv).replace(_RUN_DIR_OPT, '"$run_dir_opt"')


_WAIT_BLOCK = """\
# `wait` returns early whenever a trapped signal arrives: keep waiting until srun is gone.
while :; do
  wait "$workers"; rc=$?
  kill -0 "$workers" 2>/dev/null && continue
  if [ "$rc" -gt 128 ]; then wait "$workers" 2>/dev/null; r=$?; [ "$r" -ne 127 ] && rc=$r; fi
  break
done
echo "[bigbatch] workers exited with status $rc"
{scale_out_block}if [ "$got_term" = 0 ] && {requeue_test}; then
  echo "[bigbatch] requeueing job ${{SLURM_JOB_ID}} to resume from its checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
"""


# scale-out: the run saved a checkpoint and asks for more nodes (the count in the file, capped at
# --max-nodes); the same script goes to a new job on that many nodes once this one has ended.
# SLURM_* of this job must not leak into the new one (SLURM_CONF names the cluster: kept).
_SCALE_OUT_BLOCK = """\
if [ "$got_term" = 0 ] && [ "$rc" = {code} ]; then
  next=$(cat "$BIGBATCH_SCALE_OUT_FILE" 2>/dev/null); rm -f "$BIGBATCH_SCALE_OUT_FILE"
  case "$next" in ''|*[!0-9]*) next={max_nodes};; esac
  [ "$next" -gt {max_nodes} ] && next={max_nodes}
  if [ "$next" -gt "$SLURM_JOB_NUM_NODES" ]; then
    unset_slurm=$(compgen -e | grep '^SLURM_' | grep -vx SLURM_CONF | sed 's/^/-u /')
    new_job=$(env $unset_slurm BIGBATCH_CONTINUES=1 sbatch --parsable --nodes="$next" --dependency=afterany:"$SLURM_JOB_ID" "$0")
    if [ -n "$new_job" ]; then
      echo "[bigbatch] scale-out: job ${{new_job%%;*}} continues on $next nodes after job ${{SLURM_JOB_ID}}"
      exit 0
    fi
    echo "[bigbatch] scale-out: sbatch of the $next-node job failed; resume by hand with --resume"
  fi
fi
"""


def render_sbatch(cfg: SubmitConfig) -> str:
    """The sbatch script for ``cfg`` (validated first)."""
    cfg.validate()
    path = template_dir() / f"{cfg.template}.sbatch"
    if not path.is_file():
        raise SubmitError(f"--template: {path} does not exist")
    text = path.read_text()
    lines = []
    if cfg.signal_seconds and cfg.requeue:
        lines.append(f"#SBATCH --signal=B:USR1@{cfg.signal_seconds}")
    lines.append("#SBATCH --requeue" if cfg.requeue else "#SBATCH --no-requeue")
    if cfg.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={cfg.gpus_per_node}")
    for opt in ("partition", "account", "qos"):
        if getattr(cfg, opt):
            lines.append(f"#SBATCH --{opt}={getattr(cfg, opt)}")
    lines += [f"#SBATCH {arg}" for arg in cfg.sbatch_args]
    env = {"PYTHONUNBUFFERED": "1", **cfg.env}
    scale_out = cfg.scales_out
    if scale_out:
        env[MAX_NODES_ENV] = str(cfg.max_nodes)
    worker, run_dir_lines = _requeue_safe(cfg, _worker_argv(cfg))
    if not cfg.requeue:
        requeue_test = "false"
    elif cfg.template == "srun":
        requeue_test = f'[ "$rc" = {cfg.preempt_exit_code} ]'
    else:  # torchrun turns the workers' status into its own; trust the USR1 we saw
        requeue_test = '[ "$got_usr1" = 1 ] && [ "$rc" != 0 ]'
    torchrun_cmd = worker[1:] if worker[0] == cfg.python else ["--no-python", *worker]
    values = {
        "job_name": cfg.job_name,
        "nodes": str(cfg.nodes),
        "tasks_per_node": str(cfg.workers_per_node),
        "cpus_per_task": str(cfg.cpus_per_task),
        "cpus_per_node": str(cfg.cpus_per_task * cfg.workers_per_node),
        "time": cfg.time,
        "output": cfg.output,
        "workdir": cfg.workdir,
        "signal_seconds": str(cfg.signal_seconds),
        "preempt_exit_code": str(cfg.preempt_exit_code),
        "exit_grace": str(cfg.exit_grace),
        "sbatch_lines": "\n".join(lines),
        # sbatch passes the submitting shell's environment on; its launcher variables (a shell
        # inside torchrun, a notebook that ran a process group) must not name the workers' ranks.
        "env_lines": "\n".join([f"unset {' '.join(LAUNCHER_VARS)}"] +
                               [f"export {k}={shlex.quote(v)}" for k, v in env.items()] + (
            ['export BIGBATCH_SCALE_OUT_FILE="${TMPDIR:-/tmp}/bigbatch-scale-out-${SLURM_JOB_ID}"'] if scale_out else [])),
        "srun_args": "".join(shlex.quote(a) + " " for a in cfg.srun_args),
        "python": shlex.quote(cfg.python),
        "command": _shell_join(worker),
        "torchrun_command": _shell_join(torchrun_cmd),
        "run_dir_lines": run_dir_lines,
        "port_base": str(SLURM_PORT_BASE),
        "port_span": str(SLURM_PORT_SPAN),
        "wait_block": _WAIT_BLOCK.format(requeue_test=requeue_test, scale_out_block=_SCALE_OUT_BLOCK.format(
            code=exit_codes.SCALE_OUT, max_nodes=cfg.max_nodes) if scale_out else ""),
    }
    unknown = sorted(set(_FIELD.findall(text)) - set(values))
    if unknown:
        raise SubmitError(f"template {path}: unknown fields {unknown}")
    return _FIELD.sub(lambda m: values[m.group(1)], text)


def submit(cfg: SubmitConfig, *, wait: bool = False, sbatch: str = "sbatch") -> str:
    """Submit ``cfg`` with ``sbatch --parsable`` (script on stdin) and return the job id.
    ``wait``: block until the job ends (``sbatch --wait``); a failed job raises."""
    script = render_sbatch(cfg)
    exe = shutil.which(sbatch)
    if exe is None:
        raise SubmitError(f"sbatch: {sbatch!r} is not on PATH; is this a SLURM login node?")
    argv = [exe, "--parsable"] + (["--wait"] if wait else [])
    proc = subprocess.run(argv, input=script, text=True, capture_output=True)
    job_id = proc.stdout.strip().split(";")[0].splitlines()[0] if proc.stdout.strip() else ""
    if proc.returncode != 0 and not (wait and job_id):
        raise SubmitError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed no job id: {proc.stdout!r} {proc.stderr!r}")
    if wait and proc.returncode != 0:
        raise SubmitError(f"job {job_id} failed (sbatch --wait exit {proc.returncode}): {proc.stderr.strip()}")
    return job_id


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bigbatch submit`` (the command after ``--`` is the caller's to add)."""
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--max-nodes", type=int, default=None,
                        help="scale-out: on exit code 76 (the run's scale_out policy) submit the same command again "
                         "on more nodes, up to this many")
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--ntasks-per-node", type=int, default=None, help="workers per node (default: GPUs, or 1)")
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--template", choices=TEMPLATES, default="srun")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--time", default="01:00:00")
    parser.add_argument("--job-name", default="bigbatch")
    parser.add_argument("--output", default="slurm-%j.out")
    parser.add_argument("--chdir", default=None)
    parser.add_argument("--signal-seconds", type=int, default=120, help="USR1 this long before the time limit")
    parser.add_argument("--exit-grace", type=int, default=DEFAULT_EXIT_GRACE_S,
                        help="seconds the other workers get after the first exits (srun --wait)")
    parser.add_argument("--no-requeue", action="store_true")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH option, verbatim")
    parser.add_argument("--srun-arg", action="append", default=[], help="extra srun option, e.g. --mpi=pmix")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument("--wait", action="store_true", help="return when the job ends")


def submit_config(args) -> SubmitConfig:
    """The :class:`SubmitConfig` of parsed ``bigbatch submit`` options."""
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SubmitError(f"--env: {item!r} must be KEY=VALUE")
        env[key] = value
    return SubmitConfig(
        command=list(args.command), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.ntasks_per_node, cpus_per_task=args.cpus_per_task, template=args.template,
        partition=args.partition, account=args.account, qos=args.qos, time=args.time,
        job_name=args.job_name, output=args.output, workdir=args.chdir or os.getcwd(),
        signal_seconds=args.signal_seconds, exit_grace=args.exit_grace, requeue=not args.no_requeue, python=args.python,
        env=env, sbatch_args=list(args.sbatch_arg), srun_args=list(args.srun_arg),
        max_nodes=args.max_nodes,
    )


def strip_separator(args) -> None:
    """Drop the ``--`` that separates a launcher's options from its command."""
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]


def parse_submit(options: list[str], command: list[str]):
    """``bigbatch submit OPTIONS -- COMMAND`` parsed (a bad option exits 2 with one line)."""
    parser = ArgumentParser(prog="bigbatch submit")
    add_submit_arguments(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args([*options, "--", *command])
    strip_separator(args)
    return args
