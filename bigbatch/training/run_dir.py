"""The run directory: which run a command line means (new, resumed, overwritten), what a run writes
there, and whether it can write there at all."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import yaml

from bigbatch import atomic
from bigbatch import distributed as bbdist
from bigbatch.cli_parser import ArgumentParser
from bigbatch.sharding import tags
from bigbatch.training.config import (ConfigError, RunConfig, apply_overrides, config_from_dict, dump_yaml,
                                      load_config, parse_overrides)
from bigbatch.training.init_from import use_run_files
from bigbatch.training.metrics import format_hparams, last_logged_step
from bigbatch.training.model import count_parameters

#: the run's tokenizer (save_pretrained files) and its transformers model config, written at the start
TOKENIZER_DIR = "tokenizer"
HF_CONFIG = "hf_config.json"
#: everything a run writes into its directory (--overwrite removes these and nothing else)
RUN_FILES = ("metrics.jsonl", "config.resolved.yaml", "checkpoints", "tensorboard", "loss.png", TOKENIZER_DIR,
             HF_CONFIG, "hf", "wandb")
RESOLVED = "config.resolved.yaml"


def parse_args(argv: list[str] | None, description: str | None = None):
    """train.py's command line: (options, overrides) where the options are ``config``, ``out``,
    ``resume`` and ``overwrite``."""
    p = ArgumentParser(prog="train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML (configs/*.yaml)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    args, rest = p.parse_known_args(argv)
    return args, parse_overrides(rest)


def resolve_run(config: str | None, out: str | None, resume: str | None, overwrite: bool,
                overrides: list[tuple[str, str]]) -> tuple[RunConfig, str, bool]:
    """(config, run directory, resuming) from the command line. ``--resume DIR`` takes DIR's saved
    config, with the overrides on top; ``--config`` only where DIR holds none yet (the first start of
    a requeue-safe command, ``--config C --resume DIR``; :func:`resume_config_note` says so). A new run
    refuses a directory that already holds one unless ``overwrite``."""
    if resume:
        if out and os.path.abspath(out) != os.path.abspath(resume):
            raise ConfigError(f"--out {out!r} and --resume {resume!r} differ; give only --resume")
        fresh = config and not os.path.isfile(os.path.join(resume, RESOLVED))
        cfg = load_config(config, overrides) if fresh else saved_config(resume, overrides, "--resume")
        check_history(cfg, resume)
        return cfg, resume, True
    if not out:
        raise ConfigError("--out: required (the run directory), or --resume DIR")
    if not config:
        raise ConfigError("--config: required (a run config such as configs/tiny.yaml)")
    cfg = load_config(config, overrides)
    problem = out_problem(out)
    if problem:  # said now, before the process group and DeepSpeed start; prepare() checks writing
        raise ConfigError(f"--out: {os.path.abspath(out)}: {problem}")
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))
                and not (os.path.isdir(os.path.join(out, f)) and not os.listdir(os.path.join(out, f)))]
    if existing and not overwrite:
        raise ConfigError(f"--out: {out!r} already holds a run ({', '.join(existing)}); "
                          "pass --resume DIR to continue it or --overwrite to replace it")
    return cfg, out, False


def resume_config_note(config: str | None, resume: str | None) -> str | None:
    """The line a resume given ``--config`` too says once: which config it runs on."""
    if not (config and resume and os.path.isfile(os.path.join(resume, RESOLVED))):
        return None
    return (f"--resume: {resume} continues on its saved config ({RESOLVED}); --config {config} is used only when the "
            "directory holds no run yet (give changes as --section.key value)")


def check_history(cfg: RunConfig, run_dir: str) -> None:
    """A resumed run whose metrics go past step 0 but whose ``checkpoints/`` holds no complete
    checkpoint (deleted, emptied, never completed) would start again from step 0: refused unless
    ``checkpoint.if_unusable: restart`` (then the old metrics are kept aside, see truncate_metrics).
    With no step logged yet (a requeue before the first save) it starts from step 0 as always.
    Damaged checkpoints are judged later, by loading them."""
    last = last_logged_step(os.path.join(run_dir, "metrics.jsonl"))
    ckpt = os.path.join(run_dir, "checkpoints")
    if last == 0 or cfg.checkpoint.if_unusable == "restart" or has_checkpoint(ckpt):
        return
    found = [t.tag for t in tags.scan(ckpt)]
    raise ConfigError(f"--resume: {os.path.abspath(run_dir)} logged steps up to {last} but "
                      f"{os.path.abspath(ckpt)} has no complete checkpoint "
                      f"({'incomplete: ' + ', '.join(found) if found else 'none there'}); restore them, or pass "
                      "--checkpoint.if_unusable restart to start from step 0 (metrics.jsonl is then kept as "
                      "metrics.jsonl.<time>)")


def saved_config(run_dir: str, overrides: list[tuple[str, str]], arg: str) -> RunConfig:
    """The config a run in ``run_dir`` ran with (its resolved YAML), with ``overrides`` on top;
    ConfigError naming ``arg`` when there is none."""
    saved = os.path.join(run_dir, RESOLVED)
    if not os.path.isfile(saved):
        raise ConfigError(f"{arg}: {run_dir!r} has no {RESOLVED}; give --config too")
    with open(saved) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{arg}: {saved} is not valid YAML ({getattr(exc, 'problem', None) or exc}); "
                              "give --config too") from None
    data.pop("resolved", None)
    cfg = config_from_dict(data, run_files=lambda c: use_run_files(c, run_dir, HF_CONFIG, TOKENIZER_DIR))
    return apply_overrides(cfg, overrides)


def clear_run(out: str) -> None:
    """--overwrite: remove only what a run writes (never other files in the directory). A directory
    that is a mount point is emptied and kept."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        try:
            if os.path.ismount(path):
                for child in os.listdir(path):
                    child = os.path.join(path, child)
                    shutil.rmtree(child) if os.path.isdir(child) and not os.path.islink(child) else os.remove(child)
            elif os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        except OSError as exc:
            raise ConfigError(f"--overwrite: cannot remove {exc.filename or path} ({exc.strerror or exc})") from None


def out_problem(path: str) -> str | None:
    """Why ``path`` cannot become a directory this process writes into, or None, leaving nothing
    behind: it or an ancestor is a file, or the nearest existing directory takes no new file (a
    probe file is created there and removed)."""
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(p) and not os.path.isdir(p):
        return "exists and is not a directory"
    ancestor = p
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{ancestor} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".bigbatch-write-test-", dir=ancestor)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        return f"cannot be created ({exc.strerror or exc}) under {ancestor}" if ancestor != p else \
            f"is not writable ({exc.strerror or exc})"
    return None


def dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be a directory this process writes into, or None. Creates it when it is
    missing, and writes and deletes a probe file (a read-only file system, a full disk or missing
    permissions show only when writing)."""
    p = os.path.abspath(os.path.expanduser(path))
    problem = out_problem(p)
    if problem:
        return problem
    try:
        os.makedirs(p, exist_ok=True)
    except OSError as exc:
        return f"cannot be created ({exc.strerror or exc})"
    try:
        fd, probe = tempfile.mkstemp(prefix=".bigbatch-write-test-", dir=p)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        return f"is not writable ({exc.strerror or exc})"
    return None


def prepare(cfg: RunConfig, out: str, info, *, overwrite: bool, resuming: bool) -> None:
    """Before any work: rank 0 clears the old run (``--overwrite``) and every directory the run
    writes must be usable by the ranks that write it (--out and its checkpoints by all, the data
    cache by each node's first rank). ConfigError on every rank, naming the path and the reason."""

    problems = []
    if info.is_main:
        try:
            if overwrite and not resuming and os.path.isdir(out):
                clear_run(out)
        except ConfigError as exc:
            problems.append(str(exc))
        problems += [f"--out: {os.path.abspath(out)}: {why}" for why in [dir_problem(out)] if why]
    bbdist.barrier()
    if not problems:
        ckpt = os.path.join(out, "checkpoints")
        problems += [f"--out: {os.path.abspath(ckpt)}: {why}" for why in [dir_problem(ckpt)] if why]
    if info.local_rank == 0:
        cache = os.path.expanduser(cfg.data.cache_dir)
        problems += [f"data.cache_dir: {os.path.abspath(cache)}: {why}" for why in [dir_problem(cache)] if why]
    errors = bbdist.agree("; ".join(problems) or None)
    if errors:
        raise ConfigError(errors[0].split(": ", 1)[1])


def write_resolved(trainer) -> dict:
    """``config.resolved.yaml`` (the config, the plan in force, sizes, engine) and the run's header line;
    returns what it wrote."""
    plan, info = trainer.plan, trainer.info
    resolved = {
        "world_size": info.world_size, "backend": info.backend,
        "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(plan).items()
                 if k not in ("hparams", "reference_hparams", "rule")} | plan.rule.forms(),
        "scaled_hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.hparams.items()},
        "tokens_per_step": trainer.tokens_per_step, "total_steps": trainer.total_steps(),
        "parameters": count_parameters(trainer.model), "vocab_size": trainer.model.config.vocab_size,
        "corpus": trainer.corpus.description, "data_cache": trainer.data.path, "train_blocks": int(len(trainer.data.train)),
        "val_blocks": int(len(trainer.data.val)), "precision": trainer.engine.precision,
        "engine": trainer.engine.name, "zero_stage": trainer.engine.zero_stage,
    }
    full = {**trainer.cfg.to_dict(), "resolved": resolved}
    dump_yaml(full, os.path.join(trainer.out, RESOLVED))
    # the hyperparameters in force (a SVAG branch has moved them to its rule by now)
    print(f"bigbatch: {count_parameters(trainer.model) / 1e6:.2f}M params | {info.world_size} proc(s) "
          f"| global batch {plan.global_batch} = {plan.micro_batch} x {plan.grad_accum} accum x "
          f"{info.world_size} (kappa {plan.kappa:g}) | {trainer.cfg.optim.name} {format_hparams(trainer.hparams)} | "
          f"steps {trainer.step}->{trainer.total_steps()} | corpus {trainer.corpus.description}", flush=True)
    return full


def save_model_files(out: str, tokenizer, model_config) -> None:
    """The run carries what an export needs besides its checkpoints (rank 0, at the start): the
    tokenizer as ``out/tokenizer/`` (written beside and renamed: whole or not at all) and the
    ``transformers`` model config as ``out/hf_config.json``. A run directory moved to another machine
    still exports."""
    target = os.path.join(out, TOKENIZER_DIR)
    tmp = tempfile.mkdtemp(dir=out, prefix=".tokenizer-")
    try:
        tokenizer.save_pretrained(tmp)
        atomic.honour_umask(tmp)
        if os.path.isdir(target):  # a resume or --overwrite: the same or a newer tokenizer
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.write_text(os.path.join(out, HF_CONFIG), model_config.to_json_string())


def has_checkpoint(ckpt_dir: str) -> bool:
    """Whether ``ckpt_dir`` holds a complete checkpoint (one a resume will load)."""
    return any(t.complete for t in tags.scan(ckpt_dir))


def resolve_train_command(command: list[str], workdir: str, *, overwrite: bool | None = None):
    """``(config, out, resuming)`` of the ``train.py`` in ``command`` (its arguments after ``train.py``),
    resolved in ``workdir`` as a launcher will start it; None for a command without train.py. Raises
    the ConfigError train.py would exit 2 with. ``overwrite``: as ``--overwrite`` (None: the command's)."""
    starts = [i for i, a in enumerate(command) if os.path.basename(a) == "train.py"]
    if not starts:
        return None
    here = os.getcwd()
    try:
        os.chdir(workdir)
        targs, overrides = parse_args(command[starts[0] + 1:])
        return resolve_run(targs.config, targs.out, targs.resume,
                           targs.overwrite if overwrite is None else overwrite, overrides)
    finally:
        os.chdir(here)
