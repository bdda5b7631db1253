"""The run directory: which run a command line means (new, resumed, overwritten) and what a run
writes there."""

from __future__ import annotations

import os
import shutil

import yaml

from bigbatch.training.config import ConfigError, RunConfig, apply_overrides, config_from_dict, load_config

#: everything a run writes into its directory (--overwrite removes these and nothing else)
RUN_FILES = ("metrics.jsonl", "config.resolved.yaml", "checkpoints", "tensorboard", "loss.png")
RESOLVED = "config.resolved.yaml"


def resolve_run(config: str | None, out: str | None, resume: str | None, overwrite: bool,
                overrides: list[tuple[str, str]]) -> tuple[RunConfig, str, bool]:
    """(config, run directory, resuming) from the command line. ``--resume DIR`` takes DIR's saved
    config unless ``--config`` is given (overrides win either way); a new run refuses a directory
    that already holds one unless ``overwrite``."""
    if resume:
        if out and os.path.abspath(out) != os.path.abspath(resume):
            raise ConfigError(f"--out {out!r} and --resume {resume!r} differ; give only --resume")
        saved = os.path.join(resume, RESOLVED)
        if config:
            cfg = load_config(config, overrides)
        elif os.path.isfile(saved):
            with open(saved) as fh:
                data = yaml.safe_load(fh)
            data.pop("resolved", None)
            cfg = apply_overrides(config_from_dict(data), overrides)  # overrides still win
        else:
            raise ConfigError(f"--resume: {resume!r} has no {RESOLVED}; give --config too")
        return cfg, resume, True
    if not out:
        raise ConfigError("--out: required (the run directory), or --resume DIR")
    if not config:
        raise ConfigError("--config: required (a run config such as configs/tiny.yaml)")
    cfg = load_config(config, overrides)
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if existing and not overwrite:
        raise ConfigError(f"--out: {out!r} already holds a run ({', '.join(existing)}); "
                          "pass --resume DIR to continue it or --overwrite to replace it")
    return cfg, out, False


def clear_run(out: str) -> None:
    """--overwrite: remove only what a run writes (never other files in the directory)."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
