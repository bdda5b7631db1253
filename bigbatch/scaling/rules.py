"""Batch-size scaling rules: carry hyperparameters tuned at one global batch to another.

``scale_hparams(optimizer, hparams, kappa)`` returns the constructor kwargs to use when the global
batch (samples per optimizer step) is ``kappa`` times the batch at which ``hparams`` were tuned.
The rules keep the stochastic differential equation (SDE) that approximates the optimizer the same
when time is measured in *samples processed*, so a run at the new batch follows the same loss curve
per sample (Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms",
NeurIPS 2022; Goyal et al. 2017 and Li et al. 2019 for SGD).

Rules (``k`` = kappa):

* Adam, AdamW, RAdam, RMSprop -- square-root rule: ``lr * sqrt(k)``; every ``beta`` (RMSprop's
  ``alpha`` too) as ``1 - k (1 - beta)`` (``beta_form="paper"``) or ``beta ** k``
  (``beta_form="power"``, equal to first order in ``1 - beta`` and always in [0, 1));
  ``eps / sqrt(k)``. Two departures from the SDE rule that practitioners use are available for
  measurement: ``beta_form="keep_beta1"`` keeps ``beta1`` (the momentum's memory in steps) and scales
  the other betas as ``"paper"``; ``beta_form="keep"`` keeps every beta (lr and eps still scale). RMSprop's heavy-ball ``momentum`` is kept fixed, as in the SGD rule below.
* SGD -- linear rule: ``lr * k``; ``momentum``, ``dampening`` and ``nesterov`` are kept fixed (the
  rule of Goyal et al. 2017 used by Malladi et al.): valid while the momentum time scale
  ``1 / (1 - momentum)`` steps is short compared with the time scale of the dynamics.
* AdaBound, AMSBound -- a derived rule (no published one), see :func:`adabound_rule_derivation`:
  the Adam part as above, ``gamma * k``, and ``final_lr * sqrt(k)`` (``bound_form="sqrt"``, the bounds
  follow Adam's lr) or ``final_lr * k`` (``bound_form="linear"``, the SGD phase's linear rule).

Weight decay. L2-coupled decay (``weight_decay`` added to the gradient: SGD, RMSprop, and Adam,
RAdam, AdaBound with ``decoupled_weight_decay=False``) is part of the gradient, and the rules already
carry the gradient over: unchanged. Decoupled decay (AdamW, and the others with
``decoupled_weight_decay=True``) shrinks the weights by ``(1 - lr * wd)`` per *step*; over ``N``
samples at batch ``B`` that is ``(1 - lr wd)^(N / B) ~ exp(-lr wd N / B)``. Keeping the decay per
sample, ``lr' wd' / (k B) = lr wd / B``, gives ``wd' = wd * k / (lr' / lr)``, that is
``wd * sqrt(k)`` under the square-root rule (the product ``lr * wd`` grows by ``k``, like the
samples per step). This is first order, exact in the SDE limit, and makes the round trip ``k`` then
``1 / k`` exact; the exact per-step match ``1 - (1 - lr wd)^k`` differs by ``O((lr wd)^2)``.

Near the critical batch. The square-root rule assumes the gradient noise dominates Adam's second moment;
:func:`noise_lr_factor` is the lr's correction, from the measured noise scale, where it does not (applied
per step by train.py's loop with ``batch.noise_lr``).

Keys the rule touches are filled from the constructor's defaults when absent from ``hparams`` (a
default ``betas=(0.9, 0.999)`` must be scaled too), so the result names them explicitly.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from bigbatch.optim.registry import canonical_name, check_kwargs, constructor_defaults, get_optimizer_class

BetaForm = Literal["paper", "power", "keep_beta1", "keep"]
BETA_FORMS = ("paper", "power", "keep_beta1", "keep")
# Adam's second moment at a batch change: rescale (the squared mean kept, the noise variance divided
# by kappa: its value at the new batch), divide (all of it divided by kappa) or keep (as the old batch left it)
SecondMoment = Literal["rescale", "divide", "keep"]
SECOND_MOMENTS = ("rescale", "divide", "keep")
# AdaBound's final_lr: sqrt (x sqrt(k), with Adam's lr) or linear (x k, SGD's rule)
BoundForm = Literal["sqrt", "linear"]
BOUND_FORMS = ("sqrt", "linear")

SQRT_RULE = frozenset({"adam", "adamw", "radam", "rmsprop"})
LINEAR_RULE = frozenset({"sgd"})
ADABOUND_RULE = frozenset({"adabound", "amsbound"})
SCALABLE = SQRT_RULE | LINEAR_RULE | ADABOUND_RULE


class ScalingRuleWarning(UserWarning):
    """A scaling rule was applied where it is known to lose validity."""


def resolve_family(optimizer: str | type) -> tuple[type[torch.optim.Optimizer], str]:
    """Class and rule family (a short name in :data:`SCALABLE`) of an optimizer name or class."""
    cls = get_optimizer_class(optimizer)
    family = canonical_name(cls)
    if family not in SCALABLE:
        raise ValueError(
            f"optimizer: no batch-size scaling rule for {cls.__module__}.{cls.__qualname__}; rules exist for "
            f"{sorted(SCALABLE)} and their subclasses"
        )
    return cls, family


def _real(field: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{field}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field}: expected a finite real number, got {value!r}")
    return float(value)


def check_form(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed`` (a form such as ``beta_form``); ValueError naming ``field``."""
    if value not in allowed:
        raise ValueError(f"{field}: must be one of {list(allowed)}, got {value!r}")
    return value


def check_kappa(kappa: Any) -> float:
    """``kappa`` as a float; raises unless it is a finite real > 0."""
    k = _real("kappa", kappa)
    if k <= 0:
        raise ValueError(f"kappa: must be > 0 (new global batch / reference global batch), got {kappa!r}")
    return k


def scale_beta(field: str, beta: Any, kappa: float, beta_form: BetaForm = "paper") -> float:
    """One EMA coefficient at ``kappa`` times the batch: ``1 - kappa (1 - beta)`` or ``beta ** kappa``;
    unchanged under ``"keep"``, and ``beta1`` unchanged under ``"keep_beta1"``."""
    b = _real(field, beta)
    if not 0.0 <= b < 1.0:
        raise ValueError(f"{field}: must be in [0, 1), got {beta!r}")
    check_form("beta_form", beta_form, BETA_FORMS)
    if beta_form == "keep" or (beta_form == "keep_beta1" and field == "beta1"):
        return b
    if beta_form == "power":
        return b**kappa
    scaled = 1.0 - kappa * (1.0 - b)
    if not 0.0 <= scaled < 1.0:
        raise ValueError(
            f"{field}={b!r} at kappa={kappa:g}: 1 - kappa*(1 - {field}) = {scaled:g} is outside [0, 1); "
            f"use beta_form='power' ({field}**kappa = {b**kappa:.6g}, equal to first order and always valid)"
        )
    return scaled


def _decoupled(family: str, hp: Mapping[str, Any]) -> bool:
    return family == "adamw" or bool(hp.get("decoupled_weight_decay", False))


def decoupled_decay(optimizer: str | type, hparams: Mapping[str, Any]) -> bool:
    """Whether ``optimizer`` with ``hparams`` (constructor kwargs or a param group) shrinks the weights by
    ``lr * weight_decay`` per step (AdamW, or ``decoupled_weight_decay=True``) rather than through the gradient."""
    cls, family = resolve_family(optimizer)
    return _decoupled(family, {**constructor_defaults(cls), **hparams})


def scale_hparams(
    optimizer: str | type,
    hparams: Mapping[str, Any],
    kappa: float,
    *,
    beta_form: BetaForm = "paper",
    bound_form: BoundForm = "sqrt",
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Constructor kwargs for ``kappa`` times the global batch at which ``hparams`` were tuned.

    Args:
        optimizer: short name (``"adam"``, ``"adamw"``, ``"radam"``, ``"rmsprop"``, ``"sgd"``,
            ``"adabound"``, ``"amsbound"``), dotted class path or class (subclasses use their base's rule).
        hparams: reference constructor kwargs (without ``params``); not modified.
        kappa: new global batch / reference global batch, any real > 0.
        beta_form: ``"paper"`` (``1 - kappa (1 - beta)``, errors when it leaves [0, 1)),
            ``"power"`` (``beta ** kappa``), ``"keep_beta1"`` (beta1 kept, the others as
            ``"paper"``) or ``"keep"`` (every beta kept).
        bound_form: AdaBound/AMSBound's ``final_lr``: ``"sqrt"`` (``x sqrt(kappa)``) or ``"linear"``
            (``x kappa``); see :func:`adabound_rule_derivation`.
        overrides: values that replace the scaled ones afterwards (e.g. ``{"gamma": 1e-3}`` to opt out
            of one part of the derived AdaBound rule).

    Returns a new dict: ``hparams`` with the scaled keys (filled from the constructor defaults when
    absent). The module docstring states every rule and the weight-decay treatment. RAdam: when the
    scaled ``beta2`` gives ``rho_inf = 2 / (1 - beta2) - 1 <= 5`` the rectified step never engages;
    with ``degenerated_to_sgd=True`` (default) RAdam then runs as SGD with momentum for the whole
    run, which is a different optimizer but trains, so a :class:`ScalingRuleWarning` is issued; with
    ``degenerated_to_sgd=False`` it would never update the weights, so ``ValueError`` is raised.
    """
    k = check_kappa(kappa)
    check_form("bound_form", bound_form, BOUND_FORMS)
    cls, family = resolve_family(optimizer)
    if not isinstance(hparams, Mapping):
        raise ValueError(f"hparams: expected a mapping of constructor kwargs, got {type(hparams).__name__}")
    check_kwargs(cls, hparams, "hparams")
    if overrides is not None:
        check_kwargs(cls, overrides, "overrides")
    defaults = constructor_defaults(cls)
    out = dict(hparams)

    def get(key: str) -> Any:
        if key in hparams:
            return hparams[key]
        if key not in defaults:
            raise ValueError(f"hparams: {key!r} is required by the {family} scaling rule and has no default")
        return defaults[key]

    if family in LINEAR_RULE:
        out["lr"] = _real("lr", get("lr")) * k
        # L2 weight decay and momentum unchanged (module docstring).
    else:
        lr_factor = math.sqrt(k)
        out["lr"] = _real("lr", get("lr")) * lr_factor
        out["eps"] = _real("eps", get("eps")) / math.sqrt(k)
        if family == "rmsprop":
            out["alpha"] = scale_beta("alpha", get("alpha"), k, beta_form)
        else:
            betas = get("betas")
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
            out["betas"] = (
                scale_beta("beta1", betas[0], k, beta_form),
                scale_beta("beta2", betas[1], k, beta_form),
            )
        if family in ADABOUND_RULE:
            out["final_lr"] = _real("final_lr", get("final_lr")) * (k if bound_form == "linear" else lr_factor)
            out["gamma"] = _real("gamma", get("gamma")) * k
        if _decoupled(family, {**defaults, **hparams}):
            wd = _real("weight_decay", get("weight_decay"))
            out["weight_decay"] = wd * k / lr_factor
    if overrides:
        out.update(overrides)
    if family == "radam":
        _check_radam(out, defaults, k)
    return out


def describe_rule(optimizer: str | type, key: str, hparams: Mapping[str, Any], *, beta_form: BetaForm = "paper",
                  bound_form: BoundForm = "sqrt") -> str:
    """How :func:`scale_hparams` moves constructor kwarg ``key`` of ``optimizer`` (given the reference
    ``hparams``) with kappa, in words such as ``"x sqrt(kappa)"``; ``"unchanged"`` for a key it keeps."""
    cls, family = resolve_family(optimizer)
    if family in LINEAR_RULE:
        return "x kappa (linear rule)" if key == "lr" else "unchanged"
    paper = "1 - kappa (1 - beta)"
    betas = {"paper": paper, "power": "beta^kappa", "keep": "unchanged",
             "keep_beta1": f"beta1 unchanged, beta2 {paper}"}
    rules = {"lr": "x sqrt(kappa)", "eps": "/ sqrt(kappa)", "betas": betas[beta_form],
             "alpha": betas[beta_form] if beta_form != "keep_beta1" else paper}
    if family in ADABOUND_RULE:
        rules.update(final_lr="x kappa" if bound_form == "linear" else "x sqrt(kappa)", gamma="x kappa")
    if _decoupled(family, {**constructor_defaults(cls), **hparams}):
        rules["weight_decay"] = "x sqrt(kappa) (decoupled: lr x wd per sample kept)"
    elif key == "weight_decay":
        return "unchanged (L2 in the gradient)"
    return rules.get(key, "unchanged")


def _check_radam(hp: Mapping[str, Any], defaults: Mapping[str, Any], kappa: float) -> None:
    beta2 = _real("beta2", hp["betas"][1])
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    if rho_inf > 5.0:
        return
    msg = (
        f"RAdam at kappa={kappa:g}: scaled beta2={beta2:.6g} gives rho_inf = 2/(1-beta2) - 1 = {rho_inf:.3g} <= 5, "
        "so the rectified adaptive step never engages"
    )
    if hp.get("degenerated_to_sgd", defaults.get("degenerated_to_sgd", True)):
        warnings.warn(msg + "; RAdam runs as SGD with momentum for the whole run", ScalingRuleWarning, stacklevel=3)
    else:
        raise ValueError(msg + " and degenerated_to_sgd=False means no update is ever made; lower kappa")


def noise_lr_factor(optimizer: str | type, global_batch: float, reference_batch: float,
                    b_noise: float | None) -> float:
    """Multiplier of the square-root rule's lr at ``global_batch`` (samples) for a run whose hyperparameters
    belong to ``reference_batch``, given the measured noise scale ``b_noise`` (samples); 1 without a
    measurement, at the reference batch, and for the linear rule (SGD: not derived here).

    The square-root rule assumes Adam's second moment is noise: ``v = sigma^2 / B`` per coordinate, so that
    ``v`` falls by kappa when the batch grows by kappa. With the gradient's mean ``mu`` it is
    ``v = mu^2 + sigma^2 / B = (sigma^2 / B) (1 + B / B_n)`` (``B_n = sigma^2 / mu^2``), which falls by
    less, and every step at the larger batch is smaller than the SDE needs, by
    ``sqrt((1 + B / B_n) / (1 + B_ref / B_n))``: both the drift (``lr mu / sqrt(v)``) and the diffusion
    (``lr^2 sigma^2 / (B v)``) per sample. Multiplying lr by that factor restores both; ``b_noise``
    (``tr(Sigma) / |G|^2``) stands for every coordinate's ``B_n``. The factor tends to 1 where the batch
    is far below the noise scale (the paper's regime) and to ``sqrt(B / B_ref)`` far above it. For AdaBound
    it applies to Adam's part of the step only: a clipped step is SGD's, for which the derivation does not
    hold, so train.py leaves the bounds where the rule puts them (moving them too cost AdaBound more than
    it gained on the tiny model, docs/science.md section 4). Decoupled weight decay (``lr * wd`` per step)
    does not involve ``v``, and train.py divides ``wd`` by the factor so that the decay stays the rule's.
    """
    _, family = resolve_family(optimizer)
    if family in LINEAR_RULE or b_noise is None or not math.isfinite(b_noise) or b_noise <= 0:
        return 1.0
    return math.sqrt((1.0 + global_batch / b_noise) / (1.0 + reference_batch / b_noise))


@dataclass(frozen=True)
class ScalingRule:
    """The batch-size scaling rule of one optimizer class, with its choices: how the betas move
    (``beta_form``), how AdaBound's ``final_lr`` moves (``bound_form``), and what a change of batch does
    to Adam's second moments (``second_moment``: :data:`SECOND_MOMENTS`). Built by :func:`rule_for`; a
    batch plan, the engines and the loop carry this object, never its settings."""

    optimizer: type
    beta_form: BetaForm = "paper"
    bound_form: BoundForm = "sqrt"
    second_moment: SecondMoment = "rescale"

    #: optimizer state the rule moves at a change of batch (Adam's second moments, AMSGrad's maximum)
    state_keys = ("exp_avg_sq", "max_exp_avg_sq")

    def __post_init__(self):
        check_form("beta_form", self.beta_form, BETA_FORMS)
        check_form("bound_form", self.bound_form, BOUND_FORMS)
        check_form("second_moment", self.second_moment, SECOND_MOMENTS)
        resolve_family(self.optimizer)

    @property
    def family(self) -> str:
        """The short name whose rule applies (``adabound``, ``adamw``, ``sgd``, ...)."""
        return resolve_family(self.optimizer)[1]

    def forms(self) -> dict[str, str]:
        """The rule's choices by name (for the resolved config and records)."""
        return {"beta_form": self.beta_form, "bound_form": self.bound_form, "second_moment": self.second_moment}

    def scale(self, hparams: Mapping[str, Any], kappa: float, overrides: Mapping[str, Any] | None = None) -> dict:
        """:func:`scale_hparams` of this optimizer with this rule's forms."""
        return scale_hparams(self.optimizer, hparams, kappa, beta_form=self.beta_form, bound_form=self.bound_form,
                             overrides=overrides)

    def describe(self, key: str, hparams: Mapping[str, Any]) -> str:
        """:func:`describe_rule` of this optimizer with this rule's forms."""
        return describe_rule(self.optimizer, key, hparams, beta_form=self.beta_form, bound_form=self.bound_form)

    def noise_lr_factor(self, global_batch: float, reference_batch: float, b_noise: float | None) -> float:
        """:func:`noise_lr_factor` for this optimizer."""
        return noise_lr_factor(self.optimizer, global_batch, reference_batch, b_noise)

    def noise_free(self, group: Mapping[str, Any]) -> dict[str, float]:
        """The values of a parameter group that the noise scale's lr factor must leave at the rule's:
        AdaBound's ``base_lr`` (its bounds, ``final_lr x lr / base_lr``: a clipped step is SGD's, for which
        the factor is not derived) and a decoupled ``weight_decay`` (``lr x wd`` per step does not involve
        Adam's second moment)."""
        out = {}
        if self.family in ADABOUND_RULE and "base_lr" in group:
            out["base_lr"] = group["base_lr"]
        if decoupled_decay(self.optimizer, group):
            out["weight_decay"] = group["weight_decay"]
        return out


def rule_for(optimizer: str | type, **forms) -> ScalingRule:
    """The :class:`ScalingRule` of an optimizer name, class path or class, with ``forms`` (``beta_form``,
    ``bound_form``, ``second_moment``; the defaults otherwise)."""
    return ScalingRule(get_optimizer_class(optimizer), **forms)


def scale_steps(steps: int, kappa: float) -> int:
    """A step count tuned at the reference batch (warmup, decay, total) at ``kappa`` times the batch.

    ``round(steps / kappa)``, at least 1 when ``steps > 0``, so the same number of samples is covered.
    Prefer schedules defined in samples (:mod:`bigbatch.scaling.schedules`), which need no conversion.
    """
    k = check_kappa(kappa)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    return 0 if steps == 0 else max(1, round(steps / k))


def adabound_rule_derivation() -> str:
    """The derivation of the AdaBound/AMSBound rule (also the docstring of this function).

    DERIVED rule, not published; every part can be replaced with ``overrides``.

    AdaBound's step is ``p -= clip(lr / (sqrt(v_hat) + eps), lower(t), upper(t)) * m_hat`` with
    ``lower(t) = final_lr (1 - 1 / (gamma t + 1))`` and ``upper(t) = final_lr (1 + 1 / (gamma t))``,
    ``t`` the step count.

    1. While the clip is inactive the update is Adam's, so the square-root rule applies to ``lr``,
       ``betas`` and ``eps``.
    2. Once the bounds bind, the step is ``final_lr * m_hat``: SGD with an EMA momentum. Its SDE
       keeps its form under the linear rule, ``final_lr * kappa``; scaling ``1 - beta1`` by
       ``kappa`` (step 1) is what that SDE also requires for an EMA momentum whose ``1 - beta1`` is
       of the order of the step size (Li et al. 2019), so both regimes agree on ``beta1``.
    3. The clip compares ``lr / sqrt(v)`` with the bounds. In the noise-dominated regime where the
       SDE rules hold, ``v`` is the gradient noise variance ``sigma^2 / B``, so under step 1
       ``lr / sqrt(v)`` grows by ``sqrt(kappa) * sqrt(kappa) = kappa``: exactly the factor applied to
       ``final_lr`` in step 2. The clip therefore binds for the same coordinates.
    4. The bounds tighten as a function of ``gamma * t``; at ``kappa`` times the batch the same
       number of samples takes ``t / kappa`` steps, so ``gamma * kappa`` keeps the passage from Adam to
       SGD at the same number of samples.

    Steps 2 and 3 give ``bound_form="linear"``: ``final_lr * kappa``, right once the bounds bind for
    most coordinates (the SGD phase; benchmarks/sde_scaling.py checks it on a noisy quadratic).
    Step 3 fails where the gradient's mean dominates ``v``: there ``lr / sqrt(v)`` grows by
    ``sqrt(kappa)`` only, and the coordinates the lower bound lifts (the largest, steadiest
    gradients) would step ``kappa`` times further. With a ``final_lr`` that leaves most coordinates
    to Adam and lifts those (the tiny Transformer's 10 with lr 3e-3), a growth 32 -> 64 late in
    training under ``linear`` sent the training loss from 3.68 to 4.90 within 13 steps and the run
    ended 2.5% behind a constant batch; ``bound_form="sqrt"`` (the default: ``final_lr * sqrt(kappa)``,
    the bounds follow Adam's lr and clip the same coordinates there) ended 0.7% behind with the same
    second-moment treatment (docs/science.md, section 4).

    The optimizer computes the effective final step as ``final_lr * lr / base_lr`` with ``base_lr``
    set to the constructor ``lr``; the kwargs returned here are constructor kwargs, so the effective
    final step is ``final_lr * kappa`` (``linear``) and later scheduler changes of ``lr`` still move it together.
    Decoupled weight decay is scaled as for Adam (``wd * sqrt(kappa)``), since the decay step is
    ``lr * wd`` whatever the clip does.
    """
    return inspect.getdoc(adabound_rule_derivation) or ""
