"""The run's gradient noise scale: when to measure it, the engine's probe, its smoothed value."""

from __future__ import annotations

import math

from bigbatch.scaling.noise_scale import GradientNoiseScale


class NoiseMeter:
    """B_noise = tr(Sigma) / |G|^2 (samples) from the engine's probe, an EMA that a resume continues
    (saved under ``state_key``). By default it measures every step whose batch has >= 2 micro batches
    over all ranks, where it costs one norm per micro batch; ``every`` 0 turns it off."""

    state_key = "noise_scale"

    def __init__(self, engine, *, every: int | None, ema: float, warn_factor: float):
        self.engine, self.every_cfg, self.ema, self.warn_factor = engine, every, ema, warn_factor
        self.probe = None
        self._saved: dict | None = None
        self.pending: list[tuple[int, int, int, int]] = []  # (step, tokens, b_small, b_big) not yet observed

    def every(self, plan) -> int:
        """Steps between measurements at ``plan`` (0: none)."""
        if self.every_cfg == 0 or not self.engine.noise_measurable(plan):
            return 0
        return self.every_cfg or 1

    def use_plan(self, plan) -> None:
        """Follow a new micro batch and accumulation; start the probe once measurable."""
        if self.probe is not None:
            self.probe.set_batch(plan.micro_batch, plan.grad_accum)
            return
        if self.every(plan):
            self.probe = self.engine.noise_probe(plan, GradientNoiseScale(ema_decay=self.ema,
                                                                          warn_factor=self.warn_factor))
            if self._saved:
                self.probe.estimator.load_state_dict(self._saved)  # the EMA continues across a resume

    def begin(self, step: int, plan):
        """``(measure, after_backward)`` for the step after ``step``: the probe records each micro
        batch's gradient, or drops it."""
        every = self.every(plan)
        measure = every > 0 and step % every == 0
        if self.probe is None:
            return measure, None
        return measure, lambda: self.probe.after_backward(measure)

    def end(self, measure: bool, grad_norm, step: int, tokens: int, sync) -> None:
        """Buffer the step's measurement in ``sync`` (nothing is read): this rank's small-batch squared
        norm and the step's reduced gradient norm; :meth:`observe` takes them at the sync point."""
        if not measure:
            return
        obs = self.probe.observation(None)
        self.pending.append((step, tokens, obs.b_small, obs.b_big))
        sync.add("noise/local", obs.local, "each", log=False)
        sync.add("noise/grad_norm", grad_norm, "each_same", log=False)

    def observe(self, values: dict) -> list[tuple[int, int, float | None]]:
        """Feed the buffered measurements, averaged over the ranks at the sync point (``values`` from
        :meth:`~bigbatch.training.step_sync.StepSync.collect`), to the EMA in step order; a step whose
        reduced gradient was not finite is passed over. Returns ``(step, tokens, B_noise after it)`` of
        each measurement taken."""
        pending, self.pending = self.pending, []
        taken = []
        for (step, tokens, b_small, b_big), local, norm in zip(pending, values.get("noise/local", []),
                                                                values.get("noise/grad_norm", [])):
            if math.isfinite(norm):
                self.probe.estimator.observe(local, norm**2, b_small, b_big)
                taken.append((step, tokens, self.b_noise))
        return taken

    @property
    def b_noise(self) -> float | None:
        """The smoothed gradient noise scale (samples), once measured."""
        return self.probe.estimator.b_noise if self.probe is not None else None

    def state_dict(self) -> dict | None:
        return self.probe.estimator.state_dict() if self.probe is not None else self._saved

    def load_state_dict(self, state: dict) -> None:
        self._saved = state
        if self.probe is not None:
            self.probe.estimator.load_state_dict(state)
