"""The learning rate of every parameter group: peak x schedule factor at the tokens seen x the noise
scale's factor, and the group values that factor must leave alone."""

from __future__ import annotations


class LrControl:
    """Sets ``lr`` (and the values tied to it) of ``engine``'s groups before each step.

    ``peak_lrs``: each group's lr at the top of the schedule, at the batch in force (the plan's; a batch
    change moves them by the rule's factors). ``schedule``: a factor of tokens
    (:class:`~bigbatch.scaling.SampleSchedule`), read at ``clock(tokens)`` when a clock is set.
    ``noise_lr``: multiply by the rule's :meth:`~bigbatch.scaling.rules.ScalingRule.noise_lr_factor` of the
    noise scale, as measured every ``every`` steps; then :attr:`factor_free` holds, per group, what must keep the rule's value
    (:meth:`~bigbatch.scaling.rules.ScalingRule.noise_free`): the factor cancels in them.
    """

    def __init__(self, engine, plan, schedule, *, noise_lr: bool, every: int = 1):
        self.engine, self.schedule, self.noise_lr, self.every = engine, schedule, noise_lr, every
        self.rule = plan.rule
        self.peak_lrs = [g["lr"] for g in engine.param_groups]
        self.factor_free = self._factor_free()
        self.clock = None  # tokens -> the tokens at which the schedule is read
        self.noise_factor = 1.0  # the noise scale's factor in the lr of the last step

    def _factor_free(self) -> list[dict[str, float]]:
        if not self.noise_lr:
            return [{} for _ in self.engine.param_groups]
        return [self.rule.noise_free(g) for g in self.engine.param_groups]

    def wants_sync(self, step: int) -> bool:
        """With the noise-scale lr, the noise scale is read every ``every`` steps (``batch.decide_every``)."""
        return self.noise_lr and step % self.every == 0

    def set(self, tokens: int, plan, b_noise: float | None) -> None:
        """lr of every group for a step that ends at ``tokens`` (so step 1 of a warmup is not lr 0), at
        ``plan``'s batch with the noise scale ``b_noise`` (samples; None: not measured)."""
        self.noise_factor = (plan.rule.noise_lr_factor(plan.global_batch, plan.reference_global_batch, b_noise)
                             if self.noise_lr else 1.0)
        mult = self.schedule.factor(self.clock(tokens) if self.clock else tokens) * self.noise_factor
        for g, peak, free in zip(self.engine.param_groups, self.peak_lrs, self.factor_free):
            g["lr"] = peak * mult
            if "base_lr" in free:
                g["base_lr"] = free["base_lr"] * self.noise_factor
            if "weight_decay" in free:
                g["weight_decay"] = free["weight_decay"] / self.noise_factor

    def before_rescale(self) -> None:
        """Put the factor-free values back, so that a rule scales the values without the factor."""
        for g, free in zip(self.engine.param_groups, self.factor_free):
            g.update(free)

    def after_rescale(self, lr_ratios: list[float]) -> None:
        """The rule moved every group's lr by ``lr_ratios``: the peaks follow, and the factor-free values
        are read back."""
        self.peak_lrs = [p * r for p, r in zip(self.peak_lrs, lr_ratios)]
        self.factor_free = [{k: g[k] for k in free} for g, free in zip(self.engine.param_groups, self.factor_free)]

    def state_dict(self) -> dict:
        return {"peak_lrs": self.peak_lrs, "factor_free": self.factor_free}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's peaks and factor-free values; a value it did not keep carries no factor."""
        self.peak_lrs = list(state.get("peak_lrs") or self.peak_lrs)
        saved = list(state.get("factor_free") or [])
        now = self._factor_free()
        self.factor_free = [{**d, **(saved[i] if i < len(saved) else {})} for i, d in enumerate(now)]
