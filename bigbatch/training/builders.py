"""Builders from the run config: batch plan, lr schedule, model and engine.

The plan (:func:`bigbatch.scaling.plan_batch`) turns the reference global batch and hyperparameters
of ``cfg.optim`` into this world size's micro batch, accumulation and scaled hyperparameters;
:func:`setup` builds the model and the engine the config names (a
:class:`~bigbatch.sharding.TrainingEngine`: DeepSpeed with the optimizer built from the plan, or FSDP2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bigbatch.distributed import default_backend
from bigbatch.scaling.planner import plan_batch
from bigbatch.scaling.schedules import SampleSchedule
from bigbatch.sharding.deepspeed_config import DSConfigError, load_ds_config
from bigbatch.sharding.deepspeed_engine import DeepSpeedEngine, build_engine
from bigbatch.sharding.fsdp2_engine import FSDP2Engine, shard_model
from bigbatch.sharding.optimizer import build_optimizer
from bigbatch.sharding.training_engine import TrainingEngine
from bigbatch.training.config import ConfigError, RunConfig
from bigbatch.training.model import build_model, compile_model, padded_vocab, param_groups


def _tuples(hparams: dict) -> dict:
    # YAML gives lists; optimizers and the scaling rules expect betas as a tuple.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}


def needs_noise_scale(cfg: RunConfig) -> bool:
    """Whether the run must measure the gradient noise scale (asked for, or an automatic batch
    schedule), so that every step needs >= 2 micro batches."""
    return cfg.batch.schedule == "auto" or bool(cfg.train.noise_scale_every)


def make_plan(cfg: RunConfig, world_size: int, global_batch: int | None = None, *, where: str = "batch"):
    """The :class:`~bigbatch.scaling.BatchPlan` for this world size: ``global_batch`` if given (a batch
    schedule's), else the schedule's first batch, else ``cfg.batch``'s policy. Planner errors become
    ConfigErrors that start with ``where`` (they name the infeasible batch and the nearest feasible
    ones)."""
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
                          beta_form=b.beta_form, bound_form=b.bound_form, second_moment=b.second_moment,
                          min_micro_batches=2 if needs_noise_scale(cfg) else 1)
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
        if cfg.train.engine == "fsdp2" and world_size < 2:
            raise ConfigError("batch.schedule: auto needs the gradient noise scale, which train.engine fsdp2 measures "
                              "only across >= 2 processes (one process: use the deepspeed engine, which splits a "
                              "step into micro batches)")
        for batch in schedule.batches():
            make_plan(cfg, world_size, batch, where=f"batch.schedule: auto grows to {batch} (min_global_batch "
                                                    f"{schedule.start} x growth_factor {schedule.factor}^k)")
    else:
        for i, (tokens, batch) in enumerate(schedule.entries):
            make_plan(cfg, world_size, batch, where=f"batch.schedule[{i}]: [{tokens}, {batch}]")


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(cfg: RunConfig, plan) -> dict:
    """The DeepSpeed config dict: JSON file <- run-config fields <- ``deepspeed.extra``. The batch
    fields come from the plan; the optimizer is the run config's (built by bigbatch), so the JSON
    may only leave its ``"optimizer"`` block to it (``"type": "auto"``)."""
    ds: dict = {}
    if cfg.deepspeed.config:
        try:
            ds = load_ds_config(cfg.deepspeed.config)
        except DSConfigError as exc:
            raise ConfigError(f"deepspeed.config: {exc}") from None
    ds = _merge(ds, cfg.deepspeed.extra)
    zero = ds.setdefault("zero_optimization", {})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", 0)
    precision = cfg.deepspeed.precision
    if precision is not None:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["train_batch_size"] = plan.global_batch
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds.setdefault("steps_per_print", 10**9)  # our logger reports; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


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
    """Plan -> model (seeded, identical on every rank; its blocks compiled with ``train.compile``) ->
    parameter groups (no decay on vectors, overrides at the reference batch) -> DeepSpeed engine with
    the optimizer built from the plan, or FSDP2."""
    check_batch(cfg, world_size)
    plan = make_plan(cfg, world_size, global_batch)
    model = build_model(cfg.model, padded_vocab(cfg.model, len(tokenizer)), seq_len, seed=cfg.train.seed,
                        eos_token_id=tokenizer.eos_token_id, init_weights=init_weights)
    if cfg.train.compile:  # before the engine wraps or shards the blocks
        compile_model(model)
    if cfg.train.engine == "fsdp2":
        return RunSetup(plan, model, _fsdp2(cfg, model, plan))
    groups = param_groups(model, float(cfg.optim.hparams.get("weight_decay", 0.0)),
                          no_decay_norms_and_biases=cfg.optim.no_decay_norms_and_biases)
    ds = deepspeed_config(cfg, plan)
    try:
        engine, _, _ = build_engine(model, ds, plan=plan, optimizer_kwargs=cfg.optim.kwargs, param_groups=groups)
    except (ValueError, TypeError, KeyError) as exc:  # DSConfigError is a ValueError
        raise ConfigError(f"deepspeed: {exc}") from None
    return RunSetup(plan, model, DeepSpeedEngine(engine, ds))


def _fsdp2(cfg: RunConfig, model, plan) -> FSDP2Engine:
    """``fully_shard`` the model (blocks and root), then the plan's optimizer on its shards."""
    f = cfg.fsdp2
    device_type = "cuda" if default_backend() == "nccl" else "cpu"
    if device_type == "cuda":
        model.to(torch.device("cuda", torch.cuda.current_device()))
    if f.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_model(model, device_type=device_type, precision=f.precision, reshard_after_forward=f.reshard_after_forward)
    groups = param_groups(model, float(cfg.optim.hparams.get("weight_decay", 0.0)),
                          no_decay_norms_and_biases=cfg.optim.no_decay_norms_and_biases)
    try:
        optimizer = build_optimizer(model, plan=plan, optimizer_kwargs=cfg.optim.kwargs, param_groups=groups)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"optim: {exc}") from None
    return FSDP2Engine(model, optimizer, precision=f.precision, grad_clip=cfg.optim.grad_clip,
                       async_save=cfg.checkpoint.async_save)
