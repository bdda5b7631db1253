"""Build a DeepSpeed engine whose client optimizer is one of ours (AdaBound, AMSBound, RAdam)."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from bigbatch.sharding.config import DSConfigError, ResolvedConfig, resolve_ds_config

logger = logging.getLogger(__name__)

_GROUP_RESERVED = ("params", "name")
_NOT_HPARAMS = ("foreach", "fused", "base_lr")  # implementation switches and derived values: never scaled


def _init_distributed() -> None:
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed()  # CPU accelerator -> gloo


def _scaled_group_overrides(group: dict, resolved: ResolvedConfig, plan) -> dict:
    """Per-group hyperparameters are given at the reference batch; scale them like the defaults.

    The plan holds only the scaled defaults, so the reference defaults are recovered by scaling
    back with 1/kappa (the rules round-trip), the group's overrides are laid on top, and the
    result is scaled by kappa again. Only the keys the group overrides are returned.
    """
    overrides = {k: v for k, v in group.items() if k not in _GROUP_RESERVED}
    scalable = {k: v for k, v in overrides.items() if k not in _NOT_HPARAMS}
    if plan is None or not scalable or plan.kappa == 1:
        return overrides
    from bigbatch.optim.scaling import scale_hparams

    beta_form = plan.beta_form
    defaults = {k: v for k, v in resolved.optimizer_kwargs.items() if k not in _NOT_HPARAMS}
    reference = scale_hparams(resolved.optimizer_name, defaults, 1.0 / plan.kappa, beta_form=beta_form)
    scaled = scale_hparams(resolved.optimizer_name, {**reference, **scalable}, plan.kappa, beta_form=beta_form)
    return {**overrides, **{k: scaled[k] for k in scalable}}


def _model_parameters(model: torch.nn.Module, param_groups, resolved: ResolvedConfig, plan):
    if param_groups is None:
        return [p for p in model.parameters() if p.requires_grad]
    groups = []
    allowed = None
    if resolved.optimizer_cls is not None:
        from bigbatch.sharding.config import optimizer_param_names

        allowed = optimizer_param_names(resolved.optimizer_cls) | {"base_lr"}
    for i, group in enumerate(param_groups):
        if not isinstance(group, dict) or "params" not in group:
            raise DSConfigError(f"param_groups[{i}]: expected a dict with 'params', got {type(group).__name__}")
        if allowed is not None:
            for key in group:
                if key not in _GROUP_RESERVED and key not in allowed:
                    raise DSConfigError(f"param_groups[{i}].{key}: {resolved.optimizer_cls.__name__} does not "
                                        f"take it; allowed: {sorted(allowed)}")
        params = [p for p in group["params"] if p.requires_grad]
        g = {"params": params, **({"name": group["name"]} if "name" in group else {})}
        g.update(_scaled_group_overrides(group, resolved, plan) if resolved.optimizer_cls else
                 {k: v for k, v in group.items() if k not in _GROUP_RESERVED})
        groups.append(g)
    return groups


def build_engine(model: torch.nn.Module, ds_config, *, plan=None, param_groups=None,
                 lr_scheduler: Callable | None = None):
    """``deepspeed.initialize`` with our optimizer as client optimizer.

    Args:
        model: the module (unpartitioned; ZeRO-3 partitions it here).
        ds_config: dict or JSON path; see :func:`bigbatch.sharding.config.resolve_ds_config`.
        plan: a ``BatchPlan``; batch fields and kappa-scaled optimizer hyperparameters come from it.
        param_groups: list of dicts (``params`` plus per-group overrides at the reference batch).
        lr_scheduler: callable ``optimizer -> scheduler`` (DeepSpeed steps it at each boundary).

    Returns:
        ``(engine, optimizer, lr_scheduler)`` as ``deepspeed.initialize`` returns them.
    """
    resolved = resolve_ds_config(ds_config, model=model, plan=plan)  # refuse bad configs before DeepSpeed
    model_parameters = _model_parameters(model, param_groups, resolved, plan)
    _init_distributed()
    import deepspeed

    if torch.distributed.get_world_size() != resolved.world_size:
        raise DSConfigError(f"world size: the config was resolved for {resolved.world_size} processes ($WORLD_SIZE)"
                            f" but the process group has {torch.distributed.get_world_size()}")
    client_optimizer = None
    if resolved.optimizer_cls is not None:
        client_optimizer = resolved.optimizer_cls(model_parameters, **resolved.optimizer_kwargs)
        if plan is not None:
            logger.info("bigbatch: %s at global batch %d (kappa=%.6g vs reference %d): %s",
                        resolved.optimizer_cls.__name__, plan.global_batch, plan.kappa,
                        plan.reference_global_batch, resolved.optimizer_kwargs)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=client_optimizer,
        model_parameters=model_parameters if client_optimizer is None else None,
        lr_scheduler=lr_scheduler, config=resolved.ds_config)
    engine._bigbatch_config = resolved  # read by save/load_checkpoint (optimizer name, batch)
    return engine, optimizer, scheduler


def reports_grad_norm(engine) -> bool:
    """Whether ``engine.step()`` computes the global gradient norm (DeepSpeed 0.19: all ZeRO
    stages and precisions except fp32 at stage 0, whose plain step computes none)."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def step_with_grad_norm(engine) -> float:
    """``engine.step()`` at a gradient-accumulation boundary, returning the L2 norm of the step's
    reduced gradient (averaged over ranks and micro steps, before clipping).

    This is the large-batch norm that :class:`bigbatch.optim.NoiseScaleProbe` needs under DeepSpeed:
    ZeRO reduces (and partitions) the gradient inside ``step()``, so its norm exists only there
    (``engine.get_global_grad_norm()`` afterwards); a stage-0 fp32 engine computes none, but has
    already all-reduced the full ``.grad`` on every rank before its step. NaN if neither is there.
    """
    if not engine.is_gradient_accumulation_boundary():
        raise RuntimeError("step_with_grad_norm: call it on the last micro step of an optimizer step")
    norm = None
    if not reports_grad_norm(engine):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    engine.step()
    if norm is None:
        reported = engine.get_global_grad_norm()
        norm = float(reported) if reported is not None else float("nan")
    return norm
