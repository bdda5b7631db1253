"""The optimizer an engine carries, built by bigbatch: parameter groups whose overrides are given at
the reference batch and scaled by the batch plan, and the class from the registry."""

from __future__ import annotations

import torch

from bigbatch.optim.registry import check_kwargs, constructor_params, get_optimizer_class

_GROUP_RESERVED = ("params", "name")


def step_if_finite(optimizer: torch.optim.Optimizer, total_norm: torch.Tensor, step=None):
    """``optimizer.step()`` unless ``total_norm`` (the global gradient norm, the same on every rank) is
    NaN or inf, so every rank skips alike and no state changes. Returns whether it stepped: a bool
    scalar tensor for optimizers that skip on the device (torch's fused ones, which take ``found_inf``
    as from a GradScaler: nothing is read), else a bool read from the device. ``step``: the optimizer's
    own step, where ``optimizer.step`` is a wrapper around it."""
    step = step or optimizer.step
    finite = torch.isfinite(total_norm)
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).to(torch.float32)
        try:
            step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
        return finite
    if not bool(finite):  # the one read: an optimizer that cannot skip on the device
        return False
    step()
    return True


def optimizer_groups(model: torch.nn.Module, param_groups, cls: type | None, plan, *, error=ValueError):
    """Parameter groups for ``cls`` (all trainable parameters without ``param_groups``). A group's
    overrides are checked against ``cls``'s arguments and scaled by the plan's rule
    (:meth:`~bigbatch.scaling.BatchPlan.scale_group`); ``error`` is the exception class raised."""
    if param_groups is None:
        return [p for p in model.parameters() if p.requires_grad]
    groups = []
    allowed = constructor_params(cls) | set(getattr(cls, "group_keys", ())) if cls is not None else None
    for i, group in enumerate(param_groups):
        if not isinstance(group, dict) or "params" not in group:
            raise error(f"param_groups[{i}]: expected a dict with 'params', got {type(group).__name__}")
        if allowed is not None:
            for key in group:
                if key not in _GROUP_RESERVED and key not in allowed:
                    raise error(f"param_groups[{i}].{key}: {cls.__name__} does not take it; allowed: {sorted(allowed)}")
        overrides = {k: v for k, v in group.items() if k not in _GROUP_RESERVED}
        if plan is not None and cls is not None:
            overrides = plan.scale_group(overrides)
        params = [p for p in group["params"] if p.requires_grad]
        groups.append({"params": params, **({"name": group["name"]} if "name" in group else {}), **overrides})
    return groups


def build_optimizer(model: torch.nn.Module, *, plan, optimizer_kwargs: dict | None = None,
                    param_groups=None) -> torch.optim.Optimizer:
    """The plan's optimizer with its scaled hyperparameters and ``optimizer_kwargs`` (unscaled
    implementation switches) on ``model``'s parameters (after sharding: DTensors under FSDP2)."""
    cls = get_optimizer_class(plan.optimizer_class or plan.optimizer)
    kwargs = {**plan.hparams, **(optimizer_kwargs or {})}
    check_kwargs(cls, kwargs, "optimizer kwargs")
    return cls(optimizer_groups(model, param_groups, cls, plan), **kwargs)


def param_groups(model, weight_decay: float, *, no_decay_norms_and_biases: bool = True) -> list[dict]:
    """Two groups: matrices with ``weight_decay``, vectors (norm gains, biases) without, as GPT-2 /
    Llama pretraining does. One group when ``no_decay_norms_and_biases`` is false."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_decay_norms_and_biases:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    return groups
