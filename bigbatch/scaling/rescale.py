"""Move a live optimizer (and its lr scheduler) to a global batch ``kappa`` times the current one.

Used wherever the batch changes under a running optimizer: a resume on another batch, a batch
schedule inside a run (train.py, the HF callback). Hyperparameters of every group are rescaled by
:func:`bigbatch.scaling.rules.scale_hparams` with the relative ``kappa`` (the rules compose: scaling
by k1 then k2 equals scaling by k1*k2). AdaBound's ``base_lr``, the scheduler's ``initial_lr`` and
base lrs move with lr, so a schedule's factor and AdaBound's effective ``final_lr * lr / base_lr``
follow the rules. Step counters become ``step / kappa``: the same number of samples seen, so bias
corrections (beta^step with the rescaled beta) and AdaBound's bounds (gamma*step with gamma*kappa)
continue smoothly. Second moments (``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``) keep the squared
mean and divide the noise by ``kappa`` (:func:`rescale_second_moments`). Where the step counters
live depends on the engine (ZeRO partitions them), so :func:`rescale_param_groups` leaves them to
the caller; :func:`rescale_optimizer` does all of it for a plain torch optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from bigbatch.optim.registry import constructor_params
from bigbatch.scaling.rules import ScalingRule, rule_for

_NOT_SCALED = ("foreach", "fused")


def rescale_second_moments(optimizer, kappa: float, rule: ScalingRule) -> int:
    """Carry the Adam-family second moments of ``optimizer``'s state (``exp_avg_sq``, AMSGrad's
    ``max_exp_avg_sq``: the rule's ``state_keys``) to a batch ``kappa`` times larger, in place, unless the
    rule's ``second_moment`` is ``"keep"``; returns how many tensors moved. Call it before the betas and
    step counters move.

    ``exp_avg_sq`` estimates ``mean^2 + noise variance / B`` per coordinate. A batch ``kappa`` times
    larger keeps the first and divides the second by ``kappa``. With the bias-corrected moments
    ``m_hat`` (the estimate of the mean) and ``v_hat``: ``v_hat <- v_hat - (1 - 1 / kappa) *
    max(v_hat - m_hat^2, 0)``, so the moment never grows and never falls below ``v_hat / kappa``.
    Kept, it would relax to that value only over ``1 / (1 - beta2)`` steps (as many samples as before
    the change), and where noise dominates every step until then would be up to ``sqrt(kappa)``
    smaller than the rule intends. ``"divide"`` divides all of it by ``kappa``, which overshoots
    where the mean dominates (steps up to ``sqrt(kappa)`` too large right after the change).
    AMSGrad's running maximum moves by the same factor as ``exp_avg_sq`` of its coordinate.

    ``optimizer``: anything with torch's ``param_groups`` (``betas``) and ``state`` (``step``,
    ``exp_avg``, ``exp_avg_sq``), such as a torch optimizer or the one inside a ZeRO engine."""
    second_moment = rule.second_moment
    moment, peak_key = rule.state_keys
    if second_moment == "keep":
        return 0
    moved = 0
    for group in optimizer.param_groups:
        beta1, beta2 = group.get("betas", (0.0, 0.0))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            v, m = state.get(moment), state.get("exp_avg")
            if v is None or m is None:
                continue
            if second_moment == "divide":
                new = v / kappa
            else:
                step = float(state.get("step", 0))
                debias1 = 1 - beta1**step if step > 0 else 1.0
                debias2 = 1 - beta2**step if step > 0 else 1.0
                # the noise part of v (in v's own, uncorrected, scale): v - debias2 * m_hat^2
                noise = (v - m.square().mul_(debias2 / debias1**2)).clamp_(min=0)
                new = v - noise.mul_(1 - 1 / kappa)
            peak = state.get(peak_key)
            if peak is not None:
                # the same factor per coordinate (1 where v is 0)
                peak.mul_(torch.where(v > 0, new / v, torch.ones_like(v)))
                moved += 1
            v.copy_(new)
            moved += 1
    return moved


def rescale_param_groups(param_groups: list[dict], kappa: float, rule: ScalingRule) -> dict[str, Any]:
    """Rescale the hyperparameters of ``param_groups`` in place by ``rule``; returns ``{"groups": [the
    new constructor kwargs of each group], "lr_ratios": [new / old lr of each group]}``."""
    names = constructor_params(rule.optimizer)
    report: dict[str, Any] = {"kappa": kappa, "groups": [], "lr_ratios": []}
    for group in param_groups:
        hp = {k: group[k] for k in names if k in group and k not in _NOT_SCALED}
        new = rule.scale(hp, kappa)
        ratio = new["lr"] / hp["lr"] if hp.get("lr") else 1.0
        report["lr_ratios"].append(ratio)
        for key in ("base_lr", "initial_lr"):
            if key in group:
                group[key] = group[key] * ratio
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in new.items()})
        report["groups"].append(dict(new))
    return report


def rescale_scheduler(scheduler, lr_ratios: list[float], param_groups: list[dict], *,
                      kappa: float | None = None) -> tuple[int, int] | None:
    """Move an lr scheduler's base lrs by ``lr_ratios``. With ``kappa``, its step count (a schedule in
    steps at the old batch) becomes ``last_epoch / kappa`` (rounded), the same samples; returns
    ``(old, new)`` step count then."""
    if scheduler is None or not hasattr(scheduler, "base_lrs"):
        return None
    scheduler.base_lrs = [b * r for b, r in zip(scheduler.base_lrs, lr_ratios)]
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in param_groups]
    if kappa is None or not hasattr(scheduler, "last_epoch"):
        return None
    old = scheduler.last_epoch
    scheduler.last_epoch = int(round(old / kappa))
    return old, scheduler.last_epoch


def rescale_optimizer(optimizer, kappa: float, rule: ScalingRule | None = None, *, scheduler=None,
                      scheduler_in_samples: bool = False) -> dict[str, Any]:
    """:func:`rescale_param_groups` for a torch optimizer, its per-parameter ``step`` counters
    divided by ``kappa``, its second moments by :func:`rescale_second_moments`, and its scheduler's
    base lrs (its step count too unless the schedule is ``scheduler_in_samples``: one that knows the
    batch itself). ``rule``: default, the optimizer class's with the default forms."""
    rule = rule or rule_for(type(optimizer))
    moved = rescale_second_moments(optimizer, kappa, rule)  # first: it reads the old betas
    report = rescale_param_groups(optimizer.param_groups, kappa, rule)
    report["second_moments"] = moved
    for state in optimizer.state.values():
        step = state.get("step")
        if step is None:
            continue
        if hasattr(step, "div_"):
            step.div_(kappa)
        else:
            state["step"] = step / kappa
    report["scheduler_steps"] = rescale_scheduler(scheduler, report["lr_ratios"], optimizer.param_groups,
                                                  kappa=None if scheduler_in_samples else kappa)
    return report
