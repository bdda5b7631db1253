"""The one interface the training loop and ``bigbatch check-rules`` see of an engine.

:class:`TrainingEngine` is implemented by :class:`~bigbatch.sharding.deepspeed_engine.DeepSpeedEngine`
(DeepSpeed ZeRO 0-3) and :class:`~bigbatch.sharding.fsdp2_engine.FSDP2Engine` (``fully_shard``); the loop
knows nothing else of either. Units: micro batches are LongTensors ``(micro_batch, seq_len)``; losses
are mean cross-entropies in nats per predicted token; gradient norms are L2 norms over every parameter.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from bigbatch.sharding import tags


@dataclass
class StepOutput:
    """What one optimizer step gave, left on the device: ``metrics`` by name (``loss``: mean
    cross-entropy over this rank's micro batches, nats/token, a float64 scalar tensor; ``grad_norm``:
    global L2 norm of the gradient before clipping, a scalar tensor) and ``applied``: whether the
    step changed the weights (a bool, or a bool scalar tensor where the engine decided on the
    device without reading the gradient norm)."""

    metrics: dict
    applied: object


def mean_loss(losses: list[torch.Tensor]) -> torch.Tensor:
    """The mean of micro-batch losses as a float64 scalar tensor, added in order (no read)."""
    total = losses[0].detach().double()
    for loss in losses[1:]:
        total = total + loss.detach().double()
    return total / len(losses)


class TrainingEngine(abc.ABC):
    """A model and bigbatch's optimizer on this rank, trained in steps of micro batches.

    Attributes: ``name`` ("deepspeed" | "fsdp2"), ``precision`` ("fp32" | "bf16" | "fp16"),
    ``zero_stage`` (None outside DeepSpeed), ``module`` (the model as the engine wraps it),
    ``optimizer`` (bigbatch's optimizer on this rank's shard).
    """

    name: str
    precision: str
    zero_stage: int | None = None
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's groups: the loop sets their ``lr`` every step."""
        return self.optimizer.param_groups

    @abc.abstractmethod
    def train_step(self, micro_batches: list[torch.Tensor], device, after_backward=None,
                   weights: list[float] | None = None) -> StepOutput:
        """One optimizer step over this rank's micro batches; the gradient is the mean over every
        micro batch of every rank. ``after_backward()`` runs after each backward pass (the noise-scale
        probe); ``weights``: a multiplier per micro batch of the differentiated loss (the reported loss
        is not weighted). Reads nothing from the device beyond what the engine's own library does. A
        step whose gradient is not finite changes nothing (``applied`` is then False)."""

    @abc.abstractmethod
    def noise_measurable(self, plan) -> bool:
        """Whether this engine can measure the gradient noise scale at ``plan``'s layout."""

    @abc.abstractmethod
    def noise_probe(self, plan, estimator):
        """A probe (``after_backward(measure)``, ``step_done(global_sq_norm)``, ``skip_step()``,
        ``set_batch(micro_batch, grad_accum)``) feeding ``estimator``."""

    @abc.abstractmethod
    def set_layout(self, plan) -> None:
        """Micro batch and accumulation of ``plan`` from the next step on."""

    @abc.abstractmethod
    def rescale(self, kappa: float, rule) -> dict:
        """Every group's hyperparameters by ``rule`` (a :class:`~bigbatch.scaling.rules.ScalingRule`) for a
        batch ``kappa`` times larger (:func:`bigbatch.scaling.rescale.rescale_param_groups`), the second moments by
        :func:`~bigbatch.scaling.rescale.rescale_second_moments` and the step counters by samples
        (``step / kappa``). Returns the report (``lr_ratios``: new / old lr per group,
        ``groups``: the new hyperparameters)."""

    @abc.abstractmethod
    def save(self, ckpt_dir: str, *, tag: str, client_state: dict, keep: int | None = None,
             background: bool = False) -> None:
        """Collective all-or-nothing save: ``latest`` moves only when every rank is done;
        :class:`~bigbatch.sharding.tags.CheckpointSaveError` on every rank when any failed.
        ``background``: the save may complete while training goes on, where the engine can
        (:meth:`wait_saves`)."""

    def wait_saves(self) -> None:
        """Wait for a save still completing in the background (collective); raise its
        :class:`~bigbatch.sharding.tags.CheckpointSaveError`, if it failed."""

    @abc.abstractmethod
    def load_newest(self, ckpt_dir: str, tag: str | None = None) -> dict:
        """Restore the newest good tag of ``ckpt_dir`` (or exactly ``tag``) on this world size
        (collective) and return its client state; :class:`~bigbatch.sharding.tags.NoUsableCheckpoint`
        when none loads (:class:`~bigbatch.sharding.tags.CheckpointError` when ``tag`` does not)."""

    @abc.abstractmethod
    def state_bytes(self) -> int:
        """About what one checkpoint of this engine takes on disk (bytes)."""

    @abc.abstractmethod
    def export_full_state(self) -> dict:
        """Every parameter's full float32 value and optimizer states, gathered (collective):
        ``{name: {"fp32": tensor, "state": {key: tensor}}}``."""

    # ------------------------------------------------------------------ shared by every engine

    def settle(self) -> None:
        """At the loop's sync point: an optimizer that skipped steps on the device (``found_inf``) takes them
        off its step counters (:meth:`~bigbatch.optim._base.AdamFamily.settle_steps`)."""
        settle = getattr(self.optimizer, "settle_steps", None)
        if settle is not None:
            settle()

    @torch.no_grad()
    def eval_sums(self, batches: list[torch.Tensor], device) -> tuple[float, int]:
        """(summed cross-entropy in nats, predicted positions) over this rank's batches."""
        model = self.module
        model.eval()
        total, count = None, 0
        for x in batches:
            x = x.to(device)
            loss = model(input_ids=x, labels=x).loss.double()
            n = x.numel() - x.shape[0]  # predicted positions
            total = loss * n if total is None else total + loss * n
            count += n
        model.train()
        return (0.0 if total is None else float(total)), count  # one read per evaluation

    def load(self, ckpt_dir: str, *, if_unusable: str = "fail", tag: str | None = None) -> tuple[dict | None, str | None]:
        """``(client state, note)`` of the newest good checkpoint in ``ckpt_dir`` (collective); the
        client state is None to start from step 0: no complete checkpoint (a requeue before the first
        save), or none usable with ``if_unusable="restart"``. Otherwise none usable raises
        :class:`~bigbatch.sharding.tags.NoUsableCheckpoint` listing every tag and why."""
        found = tags.scan(ckpt_dir)
        if not any(t.complete for t in found):
            partial = [t.tag for t in found]
            return None, f"incomplete checkpoints passed over: {partial}" if partial else None
        try:
            return self.load_newest(ckpt_dir, tag), None
        except tags.NoUsableCheckpoint as exc:
            if if_unusable == "restart" and tag is None:
                return None, f"{exc}\nstarting from step 0 anyway (checkpoint.if_unusable: restart)"
            raise

