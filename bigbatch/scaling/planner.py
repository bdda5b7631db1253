"""Batch planner: micro batch, gradient accumulation and scaled hyperparameters for a world size.

Two policies:

* ``"fixed"``: the global batch stays at ``global_batch`` (default: the reference batch); the
  planner picks a micro batch and gradient accumulation that reach it exactly on ``world_size``
  devices. With the default target ``kappa == 1`` and the hyperparameters are unchanged.
* ``"scale"``: each device processes ``per_device_batch`` samples per optimizer step, so the global
  batch follows the world size; ``kappa = global / reference`` and the hyperparameters are carried
  over by :func:`bigbatch.scaling.rules.scale_hparams`.

The largest micro batch that works is chosen (fewest accumulation steps, best device use).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bigbatch.optim.registry import constructor_params
from bigbatch.scaling.rules import ScalingRule, resolve_family, rule_for

Policy = Literal["fixed", "scale"]


@dataclass(frozen=True)
class BatchPlan:
    """What to run: ``global_batch = world_size * micro_batch * grad_accum`` samples per step."""

    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    reference_global_batch: int
    kappa: float
    optimizer: str  # the scaling rule's family (a short name such as "adabound")
    hparams: dict  # scaled constructor kwargs
    rule: ScalingRule = field(compare=False)  # how they were scaled; a later change of batch scales the same way
    reference_hparams: dict | None = None  # the constructor kwargs at the reference batch

    @property
    def optimizer_class(self) -> type:
        """The optimizer class planned for."""
        return self.rule.optimizer

    def scale_group(self, overrides: Mapping[str, Any]) -> dict:
        """A parameter group's overrides (given at the reference batch, like ``reference_hparams``)
        at this plan's batch: the reference hyperparameters with the overrides laid on top, scaled
        by the same rule; keys that are no constructor argument (``params``, ``name``, ``base_lr``)
        come back unchanged."""
        ctor = constructor_params(self.rule.optimizer)
        given = {k: v for k, v in overrides.items() if k in ctor}
        if not given or self.kappa == 1:
            return dict(overrides)
        if self.reference_hparams is None:
            raise ValueError("reference_hparams: this plan has none, so parameter-group overrides "
                             f"{sorted(given)} cannot be scaled; make the plan with plan_batch")
        scaled = self.rule.scale({**self.reference_hparams, **given}, self.kappa)
        return {k: (scaled[k] if k in given else v) for k, v in overrides.items()}


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}: expected an int >= 1, got {value!r}")
    return value


def _micro_sizes(micro_batch_sizes: int | Sequence[int]) -> list[int]:
    sizes = [micro_batch_sizes] if isinstance(micro_batch_sizes, int) else list(micro_batch_sizes)
    if not sizes:
        raise ValueError("micro_batch_sizes: expected at least one micro batch size that fits per device")
    for s in sizes:
        _positive_int("micro_batch_sizes", s)
    return sorted(set(sizes), reverse=True)


def _split(per_device: int, sizes: list[int], min_accum: int = 1) -> tuple[int, int] | None:
    for m in sizes:  # largest first
        if per_device % m == 0 and per_device // m >= min_accum:
            return m, per_device // m
    return None


def _nearest(target: int, unit: int, sizes: list[int], count: int = 4) -> list[str]:
    """The feasible totals ``unit * m * a`` nearest ``target``, as ``"N (micro m x accum a)"``."""
    found: dict[int, tuple[int, int]] = {}
    for m in sizes:
        step = unit * m
        for a in {max(1, target // step), max(1, math.ceil(target / step))}:
            total = step * a
            if total not in found or found[total][0] < m:
                found[total] = (m, a)
    best = sorted(found, key=lambda t: (abs(t - target), t))[:count]
    return [f"{t} (micro {found[t][0]} x accum {found[t][1]})" for t in sorted(best)]


def plan_batch(
    world_size: int,
    micro_batch_sizes: int | Sequence[int],
    *,
    reference_global_batch: int,
    optimizer: str | type,
    hparams: Mapping[str, Any],
    policy: Policy = "fixed",
    global_batch: int | None = None,
    per_device_batch: int | None = None,
    rule: ScalingRule | None = None,
    overrides: Mapping[str, Any] | None = None,
    min_micro_batches: int = 1,
) -> BatchPlan:
    """Plan the batch for ``world_size`` devices (see the module docstring for the policies).

    Args:
        world_size: data-parallel devices, >= 1.
        micro_batch_sizes: micro batch sizes (samples per device per forward) that fit in memory.
        reference_global_batch: global batch at which ``hparams`` were tuned.
        optimizer: name or class, as for :func:`~bigbatch.scaling.rules.scale_hparams`.
        hparams: reference constructor kwargs.
        policy: ``"fixed"`` or ``"scale"``.
        global_batch: ``"fixed"`` only: target global batch (default ``reference_global_batch``).
        per_device_batch: ``"scale"`` only (required): samples per device per optimizer step.
        rule: the :class:`~bigbatch.scaling.rules.ScalingRule` (default: ``optimizer``'s with its default
            forms); a later change of batch scales by the same rule. ``overrides``: values that replace
            the scaled ones.
        min_micro_batches: at least this many micro batches per optimizer step over all devices
            (``world_size * grad_accum``): the gradient noise scale needs 2. A smaller micro batch is
            taken when the largest would give fewer; ValueError when none does.

    Raises ``ValueError`` naming the field and, for unreachable batches, the nearest feasible ones.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(
            f"world_size: expected an int >= 1, got {world_size!r}; no global batch is feasible without devices"
        )
    sizes = _micro_sizes(micro_batch_sizes)
    ref = _positive_int("reference_global_batch", reference_global_batch)
    cls, family = resolve_family(optimizer)
    rule = rule or rule_for(cls)
    min_accum = -(-_positive_int("min_micro_batches", min_micro_batches) // world_size)

    if policy == "fixed":
        if per_device_batch is not None:
            raise ValueError("per_device_batch: only used by policy='scale'; policy='fixed' takes global_batch")
        target = ref if global_batch is None else _positive_int("global_batch", global_batch)
        split = _split(target // world_size, sizes) if target % world_size == 0 else None
        if split is not None and split[1] < min_accum:
            split = _split(target // world_size, sizes, min_accum)
            if split is None:
                raise ValueError(
                    f"global_batch: {target} on world_size={world_size} with micro batch sizes {sorted(sizes)} gives "
                    f"fewer than {min_micro_batches} micro batches per step; add a micro batch size that divides "
                    f"{target // world_size} at least {min_accum} times, or run on more processes")
        if split is None:
            raise ValueError(
                f"global_batch: {target} cannot be reached with world_size={world_size} and micro batch sizes "
                f"{sorted(sizes)} (it must equal world_size * micro * accum); nearest feasible global batches: "
                + ", ".join(_nearest(target, world_size, sizes))
            )
    elif policy == "scale":
        if global_batch is not None:
            raise ValueError("global_batch: only used by policy='fixed'; policy='scale' takes per_device_batch")
        if per_device_batch is None:
            raise ValueError("per_device_batch: required by policy='scale' (samples per device per optimizer step)")
        per_device = _positive_int("per_device_batch", per_device_batch)
        split = _split(per_device, sizes)
        if split is not None and split[1] < min_accum:
            split = _split(per_device, sizes, min_accum)
            if split is None:
                raise ValueError(
                    f"per_device_batch: {per_device} with micro batch sizes {sorted(sizes)} gives fewer than "
                    f"{min_micro_batches} micro batches per step on world_size={world_size}; add a micro batch size "
                    f"that divides {per_device} at least {min_accum} times, or run on more processes")
        if split is None:
            near = _nearest(per_device * world_size, world_size, sizes)
            raise ValueError(
                f"per_device_batch: {per_device} is not a multiple of any micro batch size {sorted(sizes)}; "
                f"nearest feasible global batches on world_size={world_size}: " + ", ".join(near)
            )
        target = per_device * world_size
    else:
        raise ValueError(f"policy: must be 'fixed' or 'scale', got {policy!r}")

    micro, accum = split
    kappa = target / ref
    scaled = rule.scale(hparams, kappa, overrides)
    return BatchPlan(
        world_size=world_size,
        micro_batch=micro,
        grad_accum=accum,
        global_batch=target,
        reference_global_batch=ref,
        kappa=kappa,
        optimizer=family,
        hparams=scaled,
        rule=rule,
        reference_hparams=dict(hparams),
    )
