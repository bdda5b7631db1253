"""Run config -> batch plan -> DeepSpeed config -> engine.

The batch plan comes from ``bigbatch.optim.batch_planner.plan_batch`` (issue 3) and the engine
from ``bigbatch.sharding.build_engine`` (issue 4); this module only translates the run config
into their arguments and builds the DeepSpeed JSON (ZeRO stage, precision, clipping, batch
fields from the plan, optimizer block with the *reference* hyperparameters).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from bigbatch.sharding.config import DSConfigError, load_ds_config
from bigbatch.training.config import ConfigError, RunConfig
from bigbatch.training.model import build_model, padded_vocab, param_groups


def _tuples(hparams: dict) -> dict:
    # YAML gives lists; optimizers and the scaling rules expect betas as a tuple.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}


def make_plan(cfg: RunConfig, world_size: int):
    """The :class:`BatchPlan` for this world size. Planner errors become ConfigErrors (they
    name the infeasible batch and the nearest feasible ones)."""
    from bigbatch.optim.batch_planner import plan_batch

    b = cfg.batch
    try:
        return plan_batch(world_size, list(b.micro_batch_sizes),
                          reference_global_batch=b.reference_global_batch,
                          optimizer=cfg.optim.name, hparams=_tuples(cfg.optim.hparams),
                          policy=b.policy, global_batch=b.global_batch,
                          per_device_batch=b.per_device_batch, beta_form=b.beta_form)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"batch: {exc}") from None


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(cfg: RunConfig, plan) -> dict:
    """The DeepSpeed config dict: JSON file <- run-config fields <- ``deepspeed.extra``."""
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
    # The plan's (kappa-scaled) hyperparameters plus the unscaled implementation kwargs. For our
    # optimizers build_engine takes the plan's values anyway; DeepSpeed's own types (AdamW, ...)
    # take the block as written, so it must already hold the scaled values.
    params = {**plan.hparams, **cfg.optim.kwargs}
    ds["optimizer"] = {"type": cfg.optim.name,
                       "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}
    ds.setdefault("steps_per_print", 10**9)  # our logger reports; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def precision_of(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def build(cfg: RunConfig, model, plan, *, param_groups=None):
    """(engine, optimizer, ds_config) from ``bigbatch.sharding.build_engine``."""
    from bigbatch.sharding import build_engine

    ds = deepspeed_config(cfg, plan)
    try:
        engine, optimizer, _ = build_engine(model, ds, plan=plan, param_groups=param_groups)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"deepspeed: {exc}") from None
    return engine, optimizer, ds


def lr_schedule(cfg: RunConfig):
    """The run's :class:`~bigbatch.optim.schedules.SampleSchedule` in tokens over ``train.tokens``."""
    from bigbatch.optim.schedules import SampleSchedule

    s = cfg.schedule
    decay_length = 0
    if s.kind == "wsd":
        decay_length = s.decay_tokens if s.decay_tokens is not None else int(0.2 * cfg.train.tokens)
    try:
        return SampleSchedule(warmup=s.warmup_tokens, total=cfg.train.tokens, decay=s.kind,
                              min_ratio=s.min_lr_ratio, decay_length=decay_length, unit="tokens")
    except ValueError as exc:
        raise ConfigError(f"schedule (with train.tokens={cfg.train.tokens}): {exc}") from None


def save_checkpoint(engine, ckpt_dir: str, *, tag: str, client_state: dict) -> None:
    """Collective atomic save (bigbatch.sharding): 'latest' moves only when every rank is done."""
    from bigbatch.sharding import save_checkpoint as save

    save(engine, ckpt_dir, tag=tag, client_state=client_state)


def has_checkpoint(ckpt_dir: str) -> bool:
    from bigbatch.sharding import list_checkpoints

    return bool(list_checkpoints(ckpt_dir))


def load_checkpoint(engine, ckpt_dir: str, *, plan) -> dict:
    """Restore the latest good checkpoint (falling back past a partial one) and return its
    client state; resharding and hyperparameter rescaling are bigbatch.sharding's."""
    from bigbatch.sharding import CheckpointError, load_checkpoint as load

    try:
        return load(engine, ckpt_dir, plan=plan, fallback=True)
    except CheckpointError as exc:
        raise ConfigError(f"--resume: {exc}") from None


@dataclass
class RunEngine:
    plan: object  # BatchPlan
    model: object
    engine: object
    optimizer: object
    ds_config: dict


def setup(cfg: RunConfig, world_size: int, tokenizer, seq_len: int) -> RunEngine:
    """Plan -> model (seeded, identical on every rank) -> parameter groups (no decay on vectors)
    -> DeepSpeed engine: everything between the data and the loop."""
    plan = make_plan(cfg, world_size)
    model = build_model(cfg.model, padded_vocab(cfg.model, len(tokenizer)), seq_len, seed=cfg.train.seed,
                        eos_token_id=tokenizer.eos_token_id)
    from bigbatch.sharding.config import OUR_OPTIMIZERS

    # build_engine rescales group overrides for our optimizers (given at the reference batch);
    # DeepSpeed's own types take groups as written, so they get the plan's scaled value.
    ours = cfg.optim.name.lower() in OUR_OPTIMIZERS
    wd = (cfg.optim.hparams if ours else plan.hparams).get("weight_decay", 0.0)
    groups = param_groups(model, float(wd), no_decay_norms_and_biases=cfg.optim.no_decay_norms_and_biases)
    engine, optimizer, ds = build(cfg, model, plan, param_groups=groups)
    return RunEngine(plan, model, engine, optimizer, ds)
