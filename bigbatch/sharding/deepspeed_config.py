"""DeepSpeed JSON configs: load, fill ``"auto"`` values, check, and decide who builds the optimizer.

One way for data to flow: ``dict | path`` -> :func:`load_ds_config` -> :func:`resolve_ds_config`
(batch fields from a :class:`~bigbatch.scaling.BatchPlan`, ``"auto"`` filled as HF's DeepSpeed
integration does) -> :class:`ResolvedConfig` -> ``deepspeed.initialize``. Every inconsistency is
refused here, naming the field, before DeepSpeed starts.

Who builds the optimizer. An optimizer named by the caller (a batch plan's, or ``optimizer=``) is
built by bigbatch from the registry (:mod:`bigbatch.optim.registry`) with the plan's scaled
hyperparameters, and handed to DeepSpeed as its client optimizer; the JSON's ``"optimizer"`` block
may then say ``"auto"`` or name the same optimizer. When only the JSON names one, DeepSpeed's own
types (``Adam``, ``AdamW``, ``Lamb``, ...) are left to DeepSpeed and any other name the registry
resolves (``AdaBound``, ``torch.optim.SGD``, a class path) is built by bigbatch.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from bigbatch.optim.registry import (OPTIMIZERS, check_kwargs, constructor_defaults, constructor_params,
                                     get_optimizer_class)

logger = logging.getLogger(__name__)

AUTO = "auto"
BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class DSConfigError(ValueError):
    """A DeepSpeed config that cannot work; the message names the field and what is allowed."""


@dataclass
class ResolvedConfig:
    """A DeepSpeed config ready for ``deepspeed.initialize``.

    ``ds_config`` no longer holds an ``"optimizer"`` block when ``optimizer_cls`` is set: bigbatch
    builds that optimizer and passes it to DeepSpeed as the client optimizer.
    """

    ds_config: dict
    world_size: int
    optimizer_cls: type[torch.optim.Optimizer] | None = None
    optimizer_kwargs: dict = field(default_factory=dict)
    optimizer_name: str | None = None  # registry short name, class path, or DeepSpeed's type string

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))


def load_ds_config(ds_config: dict | str | os.PathLike) -> dict:
    """A deep copy of ``ds_config`` (a dict or the path of a JSON file)."""
    if isinstance(ds_config, dict):
        return copy.deepcopy(ds_config)
    if isinstance(ds_config, (str, os.PathLike)):
        path = os.fspath(ds_config)
        if not os.path.isfile(path):
            raise DSConfigError(f"ds_config: file {path!r} does not exist")
        with open(path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as exc:
                raise DSConfigError(f"ds_config: {path!r} is not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise DSConfigError(f"ds_config: {path!r} holds a {type(cfg).__name__}, expected a JSON object")
        return cfg
    raise DSConfigError(f"ds_config: expected a dict or a JSON path, got {type(ds_config).__name__}")


def current_world_size() -> int:
    """Data-parallel world size: the process group's if one is up, else ``$WORLD_SIZE`` (default 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_auto(v: Any) -> bool:
    return isinstance(v, str) and v.lower() == AUTO


def _deepspeed_type(type_name) -> bool:
    """One of DeepSpeed's own optimizer types (it builds FusedAdam, Lamb, ... itself)."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return isinstance(type_name, str) and type_name.lower() in DEEPSPEED_OPTIMIZERS


def _registry_class(type_name) -> type[torch.optim.Optimizer]:
    try:
        return get_optimizer_class(type_name)
    except (ValueError, TypeError):
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

        raise DSConfigError(f"optimizer.type={type_name!r}: unknown; use a name of bigbatch's registry "
                            f"{sorted(OPTIMIZERS)}, a dotted class path, or one of DeepSpeed's "
                            f"{DEEPSPEED_OPTIMIZERS}") from None


def _fill_batch(cfg: dict, plan, world_size: int) -> None:
    """Batch fields from the plan, else the missing/"auto" one from the other two."""
    if plan is not None:
        if plan.world_size != world_size:
            raise DSConfigError(f"plan.world_size={plan.world_size} but the process group has "
                                f"world_size={world_size}; plan the batch for the current world size")
        want = {"train_batch_size": plan.global_batch, "train_micro_batch_size_per_gpu": plan.micro_batch,
                "gradient_accumulation_steps": plan.grad_accum}
        for key, value in want.items():
            given = cfg.get(key, AUTO)
            if not is_auto(given) and given != value:
                raise DSConfigError(f"{key}={given!r} in the DeepSpeed config contradicts the batch plan "
                                    f"({key}={value}); set it to \"auto\" or remove it")
            cfg[key] = value
    else:
        vals = {k: cfg.get(k) for k in BATCH_FIELDS}
        known = {k: v for k, v in vals.items() if v is not None and not is_auto(v)}
        for k, v in known.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DSConfigError(f"{k}={v!r}: must be a positive integer or \"auto\"")
        tb, mb, ga = (known.get(k) for k in BATCH_FIELDS)
        if mb is None and tb is None:
            raise DSConfigError("train_batch_size / train_micro_batch_size_per_gpu: at least one must be "
                                "given when no batch plan is passed")
        if ga is None:
            ga = 1 if (tb is None or mb is None) else None
        if tb is None:
            tb = mb * ga * world_size
        elif mb is None:
            if tb % (ga * world_size):
                raise DSConfigError(f"train_batch_size={tb} is not divisible by gradient_accumulation_steps"
                                    f" x world_size = {ga} x {world_size}")
            mb = tb // (ga * world_size)
        elif ga is None:
            if tb % (mb * world_size):
                raise DSConfigError(f"train_batch_size={tb} is not divisible by train_micro_batch_size_per_gpu"
                                    f" x world_size = {mb} x {world_size}")
            ga = tb // (mb * world_size)
        cfg.update(train_batch_size=tb, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga)
    tb, mb, ga = (cfg[k] for k in BATCH_FIELDS)
    if tb != mb * ga * world_size:
        raise DSConfigError(f"train_batch_size={tb} != train_micro_batch_size_per_gpu x gradient_accumulation_steps"
                            f" x world_size = {mb} x {ga} x {world_size} = {mb * ga * world_size}")


def _hidden_size(model) -> int | None:
    conf = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(conf, key, None)
        if isinstance(v, int):
            return v
    return None


def _fill_auto(cfg: dict, model) -> None:
    """Fill the remaining "auto" values as HF's integration does; drop those with no source."""
    zero = cfg.setdefault("zero_optimization", {})
    h = _hidden_size(model)
    sized = {"reduce_bucket_size": (lambda h: h * h), "stage3_prefetch_bucket_size": (lambda h: int(0.9 * h * h)),
             "stage3_param_persistence_threshold": (lambda h: 10 * h)}
    for key, fn in sized.items():
        if is_auto(zero.get(key)):
            if h is None:
                del zero[key]  # DeepSpeed's default
            else:
                zero[key] = fn(h)
    for section in ("bf16", "fp16"):
        if is_auto(cfg.get(section, {}).get("enabled")):
            cfg[section]["enabled"] = False  # no training arguments to take it from: off unless asked
    for key in ("gradient_clipping",):
        if is_auto(cfg.get(key)):
            del cfg[key]
    leftover = [path for path in _auto_paths(cfg)]
    if leftover:
        raise DSConfigError(f"{leftover[0]}=\"auto\": bigbatch has nothing to fill it from; give a value")


def _auto_paths(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _auto_paths(v, f"{prefix}.{k}" if prefix else k)
    elif is_auto(obj):
        yield prefix


def _check_stage(cfg: dict) -> int:
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DSConfigError(f"zero_optimization={zero!r}: must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise DSConfigError(f"zero_optimization.stage={stage!r}: must be 0, 1, 2 or 3")
    if "elasticity" in cfg:
        raise DSConfigError("elasticity: DeepSpeed (0.19 and later) has no elastic training; use bigbatch.scaling's batch "
                            "planner (pass plan=) instead")
    return stage


def _offload_optimizer(cfg: dict) -> bool:
    off = cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(off, dict) and str(off.get("device", "none")).lower() not in ("none", "")


@dataclass
class OptimizerChoice:
    """What a config's ``"optimizer"`` block names: ``cls`` is None when DeepSpeed builds it."""

    name: str  # registry short name, the class path as written, or DeepSpeed's type as written
    cls: type | None
    params: dict
    type_name: str  # as the config wrote it (after "auto" was resolved)


def take_optimizer_block(cfg: dict, default_type: str | type | None = None, *,
                         auto_hint: str = "name the optimizer") -> OptimizerChoice | None:
    """Check the ``"optimizer"`` block of ``cfg``; take it out (in place) when bigbatch builds it.

    ``default_type`` is the optimizer the caller names: it stands for a missing block and for
    ``"type": "auto"``, and a block naming DeepSpeed's own type for the same class is built by
    bigbatch too. Otherwise DeepSpeed's own types stay in the config for DeepSpeed; any other
    name is resolved by the registry, its params are checked against the constructor, the block is
    removed, and ``zero_allow_untested_optimizer`` (plus ``zero_force_ds_cpu_optimizer: false``
    with optimizer offload) is set as DeepSpeed requires for a client optimizer. Raises
    DSConfigError naming the field.
    """
    block = cfg.get("optimizer")
    if block is None:
        if default_type is None:
            return None
        block = {"type": default_type, "params": {}}
    if not isinstance(block, dict) or not isinstance(block.get("type"), (str, type)):
        raise DSConfigError(f"optimizer={block!r}: must be an object with a string \"type\"")
    type_name = block["type"]
    if is_auto(type_name):
        if default_type is None:
            raise DSConfigError(f"optimizer.type=\"auto\": {auto_hint}")
        type_name = default_type
        if "optimizer" in cfg:
            cfg["optimizer"] = {**block, "type": type_name}
    params = block.get("params") or {}
    if not isinstance(params, dict):
        raise DSConfigError(f"optimizer.params={params!r}: must be an object")
    if _deepspeed_type(type_name):
        named = get_optimizer_class(default_type) if default_type is not None else None
        if named is None or OPTIMIZERS.get(type_name.lower()) is not named:
            return OptimizerChoice(name=type_name, cls=None, params=dict(params), type_name=type_name)
    cls = _registry_class(type_name)
    allowed = constructor_params(cls)
    for name in params:
        if name not in allowed:
            raise DSConfigError(f"optimizer.params.{name}: {cls.__name__} does not take it; "
                                f"allowed: {sorted(allowed)}")
    cfg.pop("optimizer", None)
    cfg["zero_allow_untested_optimizer"] = True
    if _offload_optimizer(cfg):
        cfg["zero_force_ds_cpu_optimizer"] = False
    written = type_name if isinstance(type_name, str) else f"{cls.__module__}.{cls.__qualname__}"
    name = written.lower() if written.lower() in OPTIMIZERS else written
    return OptimizerChoice(name=name, cls=cls, params=dict(params), type_name=written)


def resolve_ds_config(ds_config, *, model=None, plan=None, optimizer: str | type | None = None,
                      optimizer_kwargs: dict | None = None, world_size: int | None = None) -> ResolvedConfig:
    """Check and complete a DeepSpeed config; build nothing.

    Args:
        ds_config: dict or JSON path.
        model: used only to size ``"auto"`` ZeRO buckets from ``model.config.hidden_size``.
        plan: a :class:`~bigbatch.scaling.BatchPlan`; its batch fields, its optimizer and its (already
            kappa-scaled) hyperparameters win over ``"auto"`` entries and over the JSON's values.
        optimizer: the optimizer to build (a registry name, class path or class), when no plan names it.
        optimizer_kwargs: constructor kwargs that are no hyperparameters (``foreach``, ``fused``), unscaled.
        world_size: defaults to :func:`current_world_size`.
    """
    cfg = load_ds_config(ds_config)
    world_size = current_world_size() if world_size is None else world_size
    _check_stage(cfg)
    _fill_batch(cfg, plan, world_size)

    resolved = ResolvedConfig(ds_config=cfg, world_size=world_size)
    named = optimizer if optimizer is not None else (
        (plan.optimizer_class or plan.optimizer) if plan is not None else None)
    choice = take_optimizer_block(cfg, named,
                                  auto_hint="only with a batch plan (plan=) or optimizer=, which name the optimizer")
    if choice is not None:
        if named is not None and choice.cls is not get_optimizer_class(named):
            what = f"the batch plan was made for {plan.optimizer!r}" if optimizer is None else f"optimizer={optimizer!r}"
            raise DSConfigError(f"optimizer.type={choice.type_name!r} but {what}")
        if choice.cls is None:  # DeepSpeed's own optimizer
            resolved.optimizer_name = choice.name
        else:
            params = {**choice.params, **(optimizer_kwargs or {})}
            if plan is not None:
                for name, value in plan.hparams.items():
                    given = params.get(name, AUTO)
                    if not is_auto(given) and _norm(given) != _norm(value):
                        logger.info("optimizer.params.%s=%r replaced by the batch plan's scaled value %r",
                                    name, given, value)
                    params[name] = value
            defaults = constructor_defaults(choice.cls)
            for name, value in list(params.items()):
                if is_auto(value):
                    if name not in defaults:
                        raise DSConfigError(f"optimizer.params.{name}=\"auto\": no plan value and no default")
                    params[name] = defaults[name]
            try:
                check_kwargs(choice.cls, params, "optimizer.params")
            except ValueError as exc:
                raise DSConfigError(str(exc)) from None
            if "betas" in params:
                params["betas"] = tuple(params["betas"])
            resolved.optimizer_cls, resolved.optimizer_kwargs, resolved.optimizer_name = choice.cls, params, choice.name
    _fill_auto(cfg, model)
    return resolved


def _norm(v):
    return tuple(v) if isinstance(v, list) else v
