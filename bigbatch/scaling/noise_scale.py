"""Gradient noise scale ``B_noise = tr(Sigma) / |G|^2`` from what data-parallel training computes.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A.1): the mean
gradient ``G_B`` of ``B`` i.i.d. samples has ``E |G_B|^2 = |G|^2 + tr(Sigma) / B`` (``Sigma`` the
per-sample gradient covariance). Two batch sizes ``b < B`` give unbiased estimates

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Each is smoothed by a bias-corrected EMA and ``B_noise`` is the ratio of the two EMAs (a ratio of
noisy estimates is biased; the ratio of smoothed ones is not, to first order). The batch past which
the SDE scaling rules lose validity is of the order of ``B_noise`` (the critical batch).

Where the two squared norms come from:

* small batch: the gradient of one micro batch on one rank, before any all-reduce and before it is
  accumulated into ``.grad``. :class:`GradSqNormHook` records it with tensor hooks on the
  parameters, which fire before DDP's and DeepSpeed's gradient-accumulation hooks. Checked with
  DDP (tests/test_noise_scale.py) and with DeepSpeed 0.19 engines at ZeRO stages 0-3 on 2 gloo
  ranks (fp32, accumulation 2: the recorded micro-step norms equal a plain-torch recomputation to
  1e-15). Averaging it over micro steps and ranks (one scalar all-reduce) lowers its variance and
  keeps it unbiased.
* big batch: the averaged gradient of the whole optimizer step after the all-reduce and the
  accumulation: :func:`grad_sq_norm` of ``.grad`` when every rank holds the full reduced gradient
  (DDP after the last backward, or one process). Under DeepSpeed the reduction (and ZeRO's
  partitioning) happens inside ``engine.step()``, so the norm is taken there:
  :func:`bigbatch.sharding.step_with_grad_norm` steps the engine and returns it (the engine's
  own global norm; a stage-0 fp32 engine computes none, but holds the full reduced ``.grad``
  before its step). Before ``step()``, ``engine.get_global_grad_norm()`` is None and
  ``deepspeed.utils.safe_get_full_grad`` returns the local, unreduced gradient at stages 0/1
  (measured with DeepSpeed 0.19.8).

Use with a DeepSpeed engine (what train.py does; tests/test_sharding.py checks the estimate on a
problem with known covariance at ZeRO stages 0-3 on 2 gloo ranks): create a
:class:`NoiseScaleProbe` on ``engine.module.parameters()`` with ``micro_grad_scale =
gradient_accumulation_steps`` (DeepSpeed divides the loss by it; with fp16 also divide by the loss
scale), call ``probe.micro_step_done()`` after each ``engine.backward(loss)``, step the last micro
batch with ``norm = step_with_grad_norm(engine)`` and call ``probe.step_done(global_sq_norm=norm**2)``;
then ``probe.estimator.check_batch(global_batch)`` logs the warning. On a single process without
data parallelism the micro steps of gradient accumulation are the small batches: the same calls
work with ``group=None``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bigbatch.distributed import all_reduce_floats

log = logging.getLogger(__name__)


def grad_sq_norm(parameters: Iterable[torch.Tensor]) -> float:
    """Sum of squares of ``p.grad`` over ``parameters`` (float64 accumulation; ``None`` grads skipped)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in parameters:
        if p.grad is not None:
            total += p.grad.detach().to(torch.float64).square().sum().cpu()
    return float(total)


class GradSqNormHook:
    """Squared norm of each backward pass's gradient, before accumulation and all-reduce.

    Registers a tensor hook on every parameter that requires grad; call :meth:`collect` after each
    backward to get that pass's squared norm (multiplied by ``scale ** 2``) and reset. Call
    :meth:`remove` to detach the hooks.
    """

    def __init__(self, parameters: Iterable[torch.Tensor]) -> None:
        self._acc: torch.Tensor | None = None  # float64 scalar on the gradients' device: no sync per tensor
        self._handles = [p.register_hook(self._hook) for p in parameters if p.requires_grad]
        if not self._handles:
            raise ValueError("parameters: no parameter requires grad, nothing to measure")

    def _hook(self, grad: torch.Tensor) -> None:
        # float64 accumulation inside the reduction, without a float64 copy of the gradient (6x faster
        # on CPU; a float32 norm of a 4M-element gradient was off by 1.6e-4 relative)
        sq = torch.linalg.vector_norm(grad.detach(), dtype=torch.float64).square()
        self._acc = sq if self._acc is None else self._acc + sq.to(self._acc.device)

    def take(self, scale: float = 1.0) -> torch.Tensor:
        """Squared norm since the last call, times ``scale ** 2`` (e.g. scale = accumulation steps), as a
        float64 scalar tensor on the gradients' device: nothing is read from the device."""
        value = torch.zeros((), dtype=torch.float64) if self._acc is None else self._acc * scale * scale
        self._acc = None
        return value

    def collect(self, scale: float = 1.0) -> float:
        """:meth:`take` read as a float."""
        return float(self.take(scale))

    def reset(self) -> None:
        """Drop what was recorded since the last call (a step that is not measured)."""
        self._acc = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """Bias-corrected EMAs after ``steps`` observations; ``b_noise`` is None while ``grad_sq <= 0``."""

    grad_sq: float  # |G|^2
    trace_sigma: float  # tr(Sigma), per-sample gradient covariance
    b_noise: float | None  # samples
    steps: int


@dataclass
class NoiseObservation:
    """One optimizer step's measurement before it is read: ``local`` is this rank's squared norm of its
    small-batch gradient (scalar tensor; averaged over the ranks when observed), ``big`` the squared norm
    of the step's reduced gradient (tensor or float, the same on every rank), for batches of ``b_small``
    and ``b_big`` samples."""

    local: torch.Tensor
    big: object
    b_small: int
    b_big: int


class GradientNoiseScale:
    """EMA estimator of the simple noise scale; see the module docstring.

    Args:
        ema_decay: EMA coefficient per observation, in [0, 1).
        warn_factor: :meth:`check_batch` warns when the global batch exceeds ``warn_factor * B_noise``.
    """

    def __init__(self, ema_decay: float = 0.99, warn_factor: float = 1.0) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {ema_decay!r}")
        if not warn_factor > 0:
            raise ValueError(f"warn_factor: must be > 0, got {warn_factor!r}")
        self.ema_decay = float(ema_decay)
        self.warn_factor = float(warn_factor)
        self._g = 0.0
        self._s = 0.0
        self._steps = 0
        self._warned = False

    def observe(self, small_sq_norm: float, big_sq_norm: float, b_small: float, b_big: float) -> NoiseScaleEstimate:
        """One observation: squared norms of mean gradients over ``b_small`` and ``b_big`` samples."""
        for name, v in (("small_sq_norm", small_sq_norm), ("big_sq_norm", big_sq_norm)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite value >= 0, got {v!r}")
        if not 0 < b_small < b_big:
            raise ValueError(f"b_small, b_big: need 0 < b_small < b_big, got b_small={b_small!r}, b_big={b_big!r}")
        g_est = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
        s_est = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
        d = self.ema_decay
        self._g = d * self._g + (1 - d) * g_est
        self._s = d * self._s + (1 - d) * s_est
        self._steps += 1
        return self.estimate

    def observe_distributed(
        self,
        local_sq_norm: float,
        global_sq_norm: float,
        b_local: float,
        b_global: float,
        group: dist.ProcessGroup | None = None,
    ) -> NoiseScaleEstimate:
        """:meth:`observe` with this rank's local squared norm averaged over the ranks of ``group``.

        Every rank must call it (one scalar all-reduce); all ranks then hold the same estimate.
        """
        return self.observe(all_reduce_floats([local_sq_norm], "mean", group)[0], global_sq_norm, b_local, b_global)

    def observe_all(self, observations: list[NoiseObservation], locals_: list[float], bigs: list[float]) -> int:
        """Observe buffered steps in order, given each one's ``local`` averaged over the ranks and its
        ``big``, as read at a sync point; a step whose reduced gradient was not finite is passed over.
        Returns how many were observed."""
        n = 0
        for obs, local, big in zip(observations, locals_, bigs):
            if math.isfinite(big) and math.isfinite(local):
                self.observe(local, big, obs.b_small, obs.b_big)
                n += 1
        return n

    @property
    def estimate(self) -> NoiseScaleEstimate:
        if self._steps == 0:
            return NoiseScaleEstimate(0.0, 0.0, None, 0)
        corr = 1.0 - self.ema_decay**self._steps
        g, s = self._g / corr, self._s / corr
        return NoiseScaleEstimate(g, s, s / g if g > 0 and s >= 0 else None, self._steps)

    @property
    def b_noise(self) -> float | None:
        return self.estimate.b_noise

    def check_batch(self, global_batch: int) -> bool:
        """Log a warning (once per crossing) when ``global_batch > warn_factor * B_noise``; True if past."""
        b = self.b_noise
        past = b is not None and global_batch > self.warn_factor * b
        if past and not self._warned:
            log.warning(
                "global batch %d exceeds %.3g x the measured gradient noise scale B_noise=%.1f: the batch-size "
                "scaling rules are past the critical batch and larger batches will not train proportionally faster",
                global_batch,
                self.warn_factor,
                b,
            )
        self._warned = past
        return past

    def state_dict(self) -> dict[str, float | int]:
        return {"g": self._g, "s": self._s, "steps": self._steps, "ema_decay": self.ema_decay}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self._g, self._s, self._steps = float(state["g"]), float(state["s"]), int(state["steps"])
        self.ema_decay = float(state["ema_decay"])


class NoiseScaleProbe:
    """Hook + estimator for a training loop (the hook point described in the module docstring).

    Args:
        parameters: the model's parameters (all ranks hold the same set).
        micro_batch: samples per micro batch per rank.
        micro_grad_scale: factor from a recorded micro-step gradient to that micro batch's mean
            gradient (the accumulation steps when the loss is divided by them, as DeepSpeed does).
        estimator: the :class:`GradientNoiseScale` to feed (a new one by default).
        group: process group of the data-parallel ranks (None: default group, or single process).
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        micro_batch: int,
        *,
        micro_grad_scale: float = 1.0,
        estimator: GradientNoiseScale | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch: expected an int >= 1, got {micro_batch!r}")
        self.parameters = [p for p in parameters if p.requires_grad]
        self.hook = GradSqNormHook(self.parameters)
        self.micro_batch = micro_batch
        self.micro_grad_scale = float(micro_grad_scale)
        self.estimator = estimator or GradientNoiseScale()
        self.group = group
        self._micro: list[float] = []

    def set_batch(self, micro_batch: int, micro_grad_scale: float) -> None:
        """The batch changed between two optimizer steps: new micro batch and gradient scale."""
        self.micro_batch = micro_batch
        self.micro_grad_scale = float(micro_grad_scale)

    def after_backward(self, measure: bool) -> None:
        """After each backward pass: record its gradient (``measure``), or drop it."""
        if measure:
            self.micro_step_done()
        else:
            self.hook.reset()

    def micro_step_done(self) -> None:
        """Call after each backward pass."""
        self._micro.append(self.hook.take(self.micro_grad_scale))

    def skip_step(self) -> None:
        """Drop this step's micro-batch norms (its reduced gradient was not finite)."""
        self._micro.clear()

    def observation(self, global_sq_norm) -> NoiseObservation:
        """This optimizer step's measurement, left on the device (no read, no collective): this rank's
        mean micro-batch squared norm against ``global_sq_norm``, the squared norm of the step's reduced
        gradient (a float or a scalar tensor). Call once per optimizer step on every rank, after the
        gradients are reduced; :meth:`GradientNoiseScale.observe_all` consumes it."""
        if not self._micro:
            raise RuntimeError("step_done: no micro_step_done() since the last step; call it after each backward")
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(self.group) if distributed else 1
        b_global = self.micro_batch * len(self._micro) * world
        if b_global == self.micro_batch:
            self._micro.clear()
            raise ValueError(
                "step_done: one micro batch on one rank gives only one batch size; the noise scale needs "
                "gradient accumulation (>= 2 micro steps) or >= 2 data-parallel ranks"
            )
        local = self._micro[0]
        for m in self._micro[1:]:
            local = local + m
        local = local / len(self._micro)
        self._micro.clear()
        return NoiseObservation(local, global_sq_norm, self.micro_batch, b_global)

    def step_done(self, global_sq_norm: float | None = None) -> NoiseScaleEstimate:
        """:meth:`observation` observed at once (one read and one scalar all-reduce over ``group``), for
        loops that read every step. ``global_sq_norm`` by default is computed from ``.grad`` (right when
        every rank holds the full reduced gradient, e.g. DDP or one process)."""
        big = grad_sq_norm(self.parameters) if global_sq_norm is None else float(global_sq_norm)
        obs = self.observation(big)
        return self.estimator.observe_distributed(float(obs.local), big, obs.b_small, obs.b_big, self.group)

    def remove(self) -> None:
        self.hook.remove()


class FSDPNoiseProbe:
    """The gradient noise scale under FSDP2 (needs >= 2 ranks): each rank's gradient over its whole
    local batch (``micro_batch * grad_accum`` samples, read from the reduce-scatter) against the
    reduced gradient of the step. Same interface as :class:`bigbatch.scaling.NoiseScaleProbe`."""

    def __init__(self, comm, micro_batch: int, grad_accum: int, estimator):
        self.comm, self.estimator = comm, estimator
        self.set_batch(micro_batch, grad_accum)

    def set_batch(self, micro_batch: int, grad_accum: int) -> None:
        self.local_batch = micro_batch * grad_accum

    def after_backward(self, measure: bool) -> None:
        pass  # the reduce-scatter of the last backward records the norm

    def skip_step(self) -> None:
        self.comm.take()

    def observation(self, global_sq_norm) -> NoiseObservation:
        world = dist.get_world_size() if dist.is_initialized() else 1
        # the loss was scaled by 1 / (micro batches x ranks) and FSDP sums: what a rank sent is its
        # local mean gradient / world
        local = self.comm.take() * world * world
        return NoiseObservation(local, global_sq_norm, self.local_batch, self.local_batch * world)
