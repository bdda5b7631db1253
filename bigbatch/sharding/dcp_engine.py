"""What the engines that keep a plain torch optimizer and write torch.distributed.checkpoint tags share
(FSDP2's and DDP's): rescaling, loading any engine's tag, the full state, the layout."""

from __future__ import annotations

import torch

from bigbatch.scaling.rescale import rescale_optimizer
from bigbatch.sharding.fsdp2_checkpoint import full_state, load_checkpoint
from bigbatch.sharding.optimizer import step_if_finite
from bigbatch.sharding.training_engine import StepOutput, TrainingEngine, mean_loss


class DCPEngine(TrainingEngine):
    """A :class:`TrainingEngine` with ``module`` and ``optimizer`` (a torch optimizer on the module's
    parameters, plain or DTensor) whose tags are DCP's; ``grad_clip``: the global norm's clip (0: none)."""

    grad_clip: float = 0.0

    def step_optimizer(self, losses: list[torch.Tensor]) -> StepOutput:
        """After the micro batches' backward passes: clip the gradients by their global norm (for DTensor
        gradients torch's one all-reduce), step on every rank unless the norm is not finite, and report
        the step's metrics (nothing read)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        applied = step_if_finite(self.optimizer, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput({"loss": mean_loss(losses), "grad_norm": norm}, applied)

    def state_bytes(self) -> int:
        """float32 weights and two or three moments, written once."""
        return 16 * sum(p.numel() for p in self.module.parameters())

    def load_newest(self, ckpt_dir, tag=None):
        """Any engine's tag (DCP reshards; DeepSpeed's through its by-name full state), any world size."""
        return load_checkpoint(self.module, self.optimizer, ckpt_dir, tag=tag, fallback=tag is None,
                               engine=self.name)["client_state"]

    def set_layout(self, plan) -> None:
        pass  # the loop feeds plan.grad_accum micro batches; there is no batch configuration

    def rescale(self, kappa, rule):
        return rescale_optimizer(self.optimizer, kappa, rule)

    def export_full_state(self) -> dict:
        return full_state(self.module, self.optimizer)
