"""Builders from the run config: batch plan, lr schedule, model and engine.

The plan (:func:`bigbatch.scaling.plan_batch`) turns the reference global batch and hyperparameters
of ``cfg.optim`` into this world size's micro batch, accumulation and scaled hyperparameters;
:func:`setup` builds the model and the engine the config names (a
:class:`~bigbatch.sharding.TrainingEngine`: DeepSpeed with the optimizer built from the plan, or FSDP2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bigbatch.scaling.planner import plan_batch
from bigbatch.scaling.schedules import SampleSchedule
from bigbatch.sharding.engines import ENGINES
from bigbatch.sharding.training_engine import TrainingEngine
from bigbatch.training.config import ConfigError, RunConfig
from bigbatch.training.model import build_model, compile_model, padded_vocab


def _tuples(hparams: dict) -> dict:
    # YAML gives lists; optimizers and the scaling rules expect betas as a tuple.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}


def needs_noise_scale(cfg: RunConfig) -> bool:
    """Whether the run must measure the gradient noise scale (asked for, or an automatic batch
    schedule), so that every step needs >= 2 micro batches."""
    return cfg.batch.schedule == "auto" or bool(cfg.train.noise_scale_every)


def make_plan(cfg: RunConfig, world_size: int, global_batch: int | None = None, *, where: str = "batch",
              noise: bool = True):
    """The :class:`~bigbatch.scaling.BatchPlan` for this world size: ``global_batch`` if given (a batch
    schedule's), else the schedule's first batch, else ``cfg.batch``'s policy. Planner errors become
    ConfigErrors that start with ``where`` (they name the infeasible batch and the nearest feasible
    ones). ``noise`` False: the layout without the 2 micro batches per step that measuring the noise
    scale asks for (what the batch itself needs)."""
    b = cfg.batch
    schedule = b.batch_schedule()
    if global_batch is None and schedule is not None:
        global_batch = schedule.start
    policy = "fixed" if global_batch is not None else b.policy
    try:
        return plan_batch(world_size, list(b.micro_batch_sizes),
                          reference_global_batch=b.reference_global_batch,
                          optimizer=cfg.optim.name, hparams=_tuples(cfg.optim.hparams),
                          policy=policy, global_batch=global_batch if global_batch is not None else b.global_batch,
                          per_device_batch=None if policy == "fixed" else b.per_device_batch,
                          rule=b.scaling_rule(cfg.optim.name),
                          min_micro_batches=2 if noise and needs_noise_scale(cfg) else 1)
    except (ValueError, TypeError) as exc:
        hint = ""
        if needs_noise_scale(cfg) and "micro batches per step" in str(exc):
            hint = (" (the gradient noise scale, which train.noise_scale_every or batch.schedule: auto needs, "
                    "compares micro batches with their step)")
        if str(exc).startswith(("beta1", "beta2", "alpha")):  # the rule moved a beta out of [0, 1)
            key = "alpha" if str(exc).startswith("alpha") else "betas"
            where = f"optim.hparams.{key} and {where if where != 'batch' else 'batch.*'}"
            hint = f" (kappa = global batch / batch.reference_global_batch {b.reference_global_batch})"
        raise ConfigError(f"{where}: {exc}{hint}") from None


def check_batch(cfg: RunConfig, world_size: int) -> None:
    """The run's batch, and every batch its schedule can put in force, must be reachable on this world
    size (with valid scaled betas): refused before any work, naming the schedule entry."""
    if cfg.batch.noise_lr and cfg.train.noise_scale_every == 0:
        raise ConfigError("batch.noise_lr: true moves the lr with the gradient noise scale, which "
                          "train.noise_scale_every=0 turns off; remove one of the two")
    ENGINES[cfg.train.engine].check(cfg, world_size)
    schedule = cfg.batch.batch_schedule()
    if schedule is None:
        make_plan(cfg, world_size)
        return
    if cfg.scale_out.max_nodes:  # each batch on the node counts that take it: callbacks.scale_out
        return
    if cfg.batch.schedule == "auto":
        if cfg.train.noise_scale_every == 0:
            raise ConfigError("batch.schedule: auto grows the batch on the gradient noise scale, which "
                              "train.noise_scale_every=0 turns off; remove that override or use a fixed schedule")
        for batch in schedule.batches():
            make_plan(cfg, world_size, batch, where=f"batch.schedule: auto grows to {batch} (min_global_batch "
                                                    f"{schedule.start} x growth_factor {schedule.factor}^k)")
    else:
        for i, (tokens, batch) in enumerate(schedule.entries):
            make_plan(cfg, world_size, batch, where=f"batch.schedule[{i}]: [{tokens}, {batch}]")


def lr_schedule(cfg: RunConfig):
    """The run's :class:`~bigbatch.scaling.SampleSchedule` in tokens over ``train.tokens``."""
    s = cfg.schedule
    decay_length = 0
    if s.kind == "wsd":
        decay_length = s.decay_tokens if s.decay_tokens is not None else int(0.2 * cfg.train.tokens)
    try:
        return SampleSchedule(warmup=s.warmup_tokens, total=cfg.train.tokens, decay=s.kind,
                              min_ratio=s.min_lr_ratio, decay_length=decay_length, unit="tokens")
    except ValueError as exc:
        raise ConfigError(f"schedule (with train.tokens={cfg.train.tokens}): {exc}") from None


@dataclass
class RunSetup:
    plan: object  # BatchPlan
    model: torch.nn.Module
    engine: TrainingEngine


def setup(cfg: RunConfig, world_size: int, tokenizer, seq_len: int, *, global_batch: int | None = None,
          init_weights: bool = True) -> RunSetup:
    """Plan -> model (seeded, identical on every rank; its blocks compiled with ``train.compile``) -> the
    engine ``train.engine`` names (:data:`~bigbatch.sharding.engines.ENGINES`), with the optimizer built from
    the plan."""
    check_batch(cfg, world_size)
    plan = make_plan(cfg, world_size, global_batch)
    model = build_model(cfg.model, padded_vocab(cfg.model, len(tokenizer)), seq_len, seed=cfg.train.seed,
                        eos_token_id=tokenizer.eos_token_id, init_weights=init_weights)
    if cfg.train.compile:  # before the engine wraps or shards the blocks
        compile_model(model)
    return RunSetup(plan, model, ENGINES[cfg.train.engine].build(cfg, model, plan))
