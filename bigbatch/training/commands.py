"""What callbacks may ask of the :class:`~bigbatch.training.loop.Trainer`: the command set through which
they act on the run (record a metric, log, end the run, change the batch, save), never by writing its
fields."""

from __future__ import annotations


class TrainerCommands:
    """The Trainer's commands for its callbacks. The Trainer provides what they act on: ``sync`` (a
    :class:`~bigbatch.training.step_sync.StepSync`), ``logger``, ``progress``, ``watchdog``,
    ``checkpointer``, ``lr``, ``plan``, ``info``, ``step``, ``tokens``, ``total_steps()`` and
    ``change_batch()``."""

    def record(self, name: str, value, reduce: str = "mean", *, weight: float = 1.0) -> None:
        """A field of the next train record: ``value`` (a scalar tensor or a number) of this step,
        reduced over the steps since the last record and over the ranks by ``reduce``."""
        self.sync.add(name, value, reduce, weight=weight)

    def agree(self, name: str, value, reduce: str = "max") -> None:
        """A value every rank must see alike, reduced at the next sync point into ``on_sync``'s values."""
        self.sync.add(name, value, reduce, log=False)

    def log(self, record: dict) -> None:
        self.logger.log(record)

    def say(self, text: str) -> None:
        """A line for the user on the main rank (through the progress display once it exists)."""
        if self.progress is not None:
            self.progress.write(text)
            self.progress.set_total(self.total_steps())
        elif self.info.is_main:
            print(text, flush=True)

    def warn(self, record: dict, text: str) -> None:
        """A record (``kind`` and its fields) at this step and a line for the user."""
        fields = dict(record)
        self.log({"kind": fields.pop("kind"), "step": self.step, "tokens": self.tokens, **fields})
        self.say(text)

    def beat(self, what: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(what, self.step)

    def count_skipped(self) -> int:
        """One more optimizer step was skipped (its gradient was not finite); the count so far."""
        self.skipped += 1
        return self.skipped

    def request_stop(self, exit_code: int) -> None:
        """End the run after this step's callbacks (a preemption, a move to more nodes)."""
        self.exit_code = exit_code

    def request_batch(self, global_batch: int, reason: str = "schedule") -> None:
        """Continue at ``global_batch`` (at most the :meth:`limit_batch`) from the next step."""
        if self.batch_limit is not None:
            global_batch = min(global_batch, self.batch_limit)
        if global_batch != self.plan.global_batch:
            self.change_batch(global_batch, reason=reason)

    def limit_batch(self, limit: int | None) -> None:
        """The largest global batch a schedule may put in force (the nodes in hand take no more)."""
        self.batch_limit = limit

    def set_budget(self, stop_tokens: int, max_steps: int | None) -> None:
        self.stop_tokens, self.max_steps = stop_tokens, max_steps

    def set_lr_clock(self, clock) -> None:
        """Read the lr schedule at ``clock(tokens)`` instead of the tokens seen."""
        self.lr.clock = clock

    def set_loss_weights(self, weights: list[float] | None) -> None:
        """Multipliers of this rank's micro-batch losses (SVAG)."""
        self.loss_weights = weights

    def save_checkpoint(self, reason: str) -> bool:
        """Save at this step (collective): ``periodic`` (may complete in the background), ``end``, or a
        save before the run exits (``signal``, ``scale_out``). False: a periodic save failed and
        ``checkpoint.on_save_error`` is ``continue``."""
        if reason not in ("periodic", "end") and self.watchdog is not None:
            self.watchdog.reached_save_point()
        return self.checkpointer.save(self.step, periodic=reason == "periodic")
