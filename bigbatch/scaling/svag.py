"""SVAG (Stochastic Variance Amplified Gradient): test whether an optimizer's SDE approximation holds.

Li, Malladi and Arora (NeurIPS 2021) simulate the SDE limit of SGD with a gradient whose mean is
unchanged and whose noise covariance is amplified ``l`` times, taken ``l`` times as many steps at
``lr / l``: as ``l`` grows the trajectory converges to the SDE's. When the plain run (``l = 1``) ends
where the ``l >= 2`` runs end, the SDE describes the optimizer at that learning rate and noise, and
the scaling rules derived from it apply. Malladi et al. (NeurIPS 2022, SVAG for RMSprop and Adam)
give the Adam form.

**The gradient.** bigbatch splits each step's global batch ``B`` into two halves of ``B / 2``
samples (micro batches in the order the loader hands them out: global micro index
``m * world + rank`` for micro step ``m``, first half below ``n / 2`` of ``n`` micro batches) with
mean gradients ``g1, g2``, each of covariance ``2 S / B`` (``S``: per-sample gradient covariance),
and uses::

    g = a g1 + b g2,   a, b = (1 +- sqrt(l - 1)) / 2

so ``a + b = 1`` (same mean) and ``a^2 + b^2 = l / 2``: ``Cov(g) = l S / B``, ``l`` times the noise
of the plain batch-``B`` gradient, which is ``l = 1`` exactly (``a = b = 1/2``: the mean over the
batch, the same data). The papers' form, ``(1 +- sqrt(2 l - 1)) / 2`` on two *full* batches of ``B``
(:func:`paper_weights`), has the same mean and covariance but reads ``2 B`` samples per step and
uses only one batch at ``l = 1``. The combination is applied as a multiplier of each micro batch's
loss (:func:`micro_weights`), so any engine's gradient reduction (DeepSpeed, FSDP2, DDP) computes it.

**The hyperparameters** (``l`` times the noise is the gradient of a batch ``B / l``, so SVAG is the
scaling rule of the optimizer at ``kappa = 1 / l`` while the batch stays ``B``;
:func:`svag_hparams`), with ``l`` times the steps (the tokens read grow ``l``-fold; time in the SDE
is tokens / l):

* SGD (linear rule): ``lr / l``; momentum kept.
* Adam, AdamW, RAdam (square-root rule, Malladi et al. 2022): ``lr / sqrt(l)``,
  ``1 - beta_i -> (1 - beta_i) / l``, ``eps * sqrt(l)``; decoupled weight decay ``wd / sqrt(l)``
  (the decay per unit of SDE time kept). RAdam's rectification is a function of ``beta2^t`` and
  ``t (1 - beta2)``, both kept by ``l``-fold steps with ``(1 - beta2) / l``.
* AdaBound, AMSBound: bigbatch's *derived* rule at ``kappa = 1 / l`` (no published SVAG): the
  Adam part as above, ``final_lr / l`` (the bound's SGD step follows the linear rule) and
  ``gamma / l`` so the bounds close at the same SDE time
  (:func:`bigbatch.scaling.rules.adabound_rule_derivation`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bigbatch.scaling.rules import scale_hparams


def check_l(l: Any) -> float:
    """``l`` as a float; ValueError unless it is a finite real >= 1."""
    try:
        v = float(l)
    except (TypeError, ValueError):
        raise ValueError(f"svag l: must be a number >= 1, got {l!r}") from None
    if not math.isfinite(v) or v < 1.0 or isinstance(l, bool):
        raise ValueError(f"svag l: must be a finite number >= 1 (1 = the plain optimizer), got {l!r}")
    return v


def svag_weights(l: float) -> tuple[float, float]:
    """``(a, b)`` for the two half-batch mean gradients: ``(1 +- sqrt(l - 1)) / 2``."""
    s = math.sqrt(check_l(l) - 1.0)
    return (1.0 + s) / 2.0, (1.0 - s) / 2.0


def paper_weights(l: float) -> tuple[float, float]:
    """The papers' ``(1 +- sqrt(2 l - 1)) / 2`` for two independent full-batch gradients."""
    s = math.sqrt(2.0 * check_l(l) - 1.0)
    return (1.0 + s) / 2.0, (1.0 - s) / 2.0


def micro_weights(l: float, *, rank: int, world_size: int, grad_accum: int) -> list[float]:
    """Loss multiplier of each of this rank's ``grad_accum`` micro batches so that the engine's mean
    over all ``n = world_size * grad_accum`` micro batches is ``a g1 + b g2`` (module docstring):
    ``2a`` on the first half of the global micro indices, ``2b`` on the second. ValueError when ``n``
    is odd and ``l > 1`` (the halves must be equal)."""
    l = check_l(l)
    n = world_size * grad_accum
    if l == 1.0:
        return [1.0] * grad_accum
    if n % 2:
        raise ValueError(f"svag: a step has {n} micro batches ({world_size} processes x {grad_accum} accumulation);"
                         " SVAG with l > 1 needs an even number to form two equal halves")
    a, b = svag_weights(l)
    return [2.0 * (a if m * world_size + rank < n // 2 else b) for m in range(grad_accum)]


def svag_hparams(optimizer: str | type, hparams: Mapping[str, Any], l: float, *,
                 beta_form: str = "paper") -> dict[str, Any]:
    """Constructor kwargs of the SVAG run with amplification ``l`` from ``hparams`` (the rule of the
    optimizer at ``kappa = 1 / l``; see the module docstring)."""
    return scale_hparams(optimizer, hparams, 1.0 / check_l(l), beta_form=beta_form, bound_form="linear")
