"""PyTorch DistributedDataParallel as a :class:`~bigbatch.sharding.training_engine.TrainingEngine`: every
rank holds the whole model and bigbatch's optimizer, gradients are all-reduced (averaged) in buckets
during the last backward of a step. The fastest engine for a model whose weights, gradients and
optimizer state fit one device. Checkpoints are torch.distributed.checkpoint tags like FSDP2's
(:mod:`~bigbatch.sharding.fsdp2_checkpoint`), so either engine resumes the other's and DeepSpeed's
through the by-name full state."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from bigbatch import distributed as bbdist
from bigbatch.optim.registry import canonical_name
from bigbatch.scaling.noise_scale import NoiseScaleProbe
from bigbatch.scaling.rescale import rescale_optimizer
from bigbatch.sharding.fsdp2_checkpoint import full_state, load_checkpoint, save_checkpoint
from bigbatch.sharding.optimizer import build_optimizer, param_groups, step_if_finite
from bigbatch.sharding.training_engine import StepOutput, TrainingEngine, mean_loss


class DDPEngine(TrainingEngine):
    """``model`` (unwrapped, on its device) wrapped in DDP when there is a process group of more than
    one rank, with ``optimizer`` on its parameters; ``grad_clip``: the global norm's clip (0: none)."""

    name = "ddp"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float,
                 device: torch.device):
        self.module, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.precision = "fp32"
        many = bbdist.is_initialized() and bbdist.world_size() > 1
        self.ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
            if many else None

    def noise_measurable(self, plan) -> bool:
        """Micro-batch gradients against the step's: needs >= 2 micro batches over all ranks."""
        return plan.grad_accum * plan.world_size >= 2

    def noise_probe(self, plan, estimator):
        """Tensor hooks on the parameters see each micro batch's gradient before DDP reduces it; the
        loss is divided by the accumulation."""
        return NoiseScaleProbe(self.module.parameters(), plan.micro_batch, micro_grad_scale=plan.grad_accum,
                               estimator=estimator)

    def train_step(self, micro_batches, device, after_backward=None, weights=None) -> StepOutput:
        """Gradients accumulate without a reduction (``no_sync``) until the last micro batch, whose
        backward averages them over the ranks; the loss is divided by the micro batches, so ``.grad``
        holds the global mean gradient on every rank. A non-finite norm skips the step everywhere."""
        n = len(micro_batches)
        model = self.ddp or self.module
        losses = []
        for i, x in enumerate(micro_batches):
            sync = self.ddp is None or i == n - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                x = x.to(device)
                loss = model(input_ids=x, labels=x).loss
                (loss * ((1.0 if weights is None else weights[i]) / n)).backward()
            if after_backward is not None:
                after_backward()
            losses.append(loss)
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        applied = step_if_finite(self.optimizer, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput({"loss": mean_loss(losses), "grad_norm": norm}, applied)

    def state_bytes(self) -> int:
        """float32 weights and two or three moments, written once."""
        return 16 * sum(p.numel() for p in self.module.parameters())

    def save(self, ckpt_dir, *, tag, client_state, keep=None, background=False):
        """A DCP tag written by every rank's share (DCP writes each replicated tensor once)."""
        meta = {"engine": self.name, "global_batch": client_state.get("global_batch"),
                "optimizer": canonical_name(type(self.optimizer))}
        save_checkpoint(self.module, self.optimizer, ckpt_dir, tag=tag, client_state=client_state, meta=meta,
                        keep=keep)

    def load_newest(self, ckpt_dir, tag=None):
        """Any engine's tag, saved on any world size."""
        return load_checkpoint(self.module, self.optimizer, ckpt_dir, tag=tag, fallback=tag is None,
                               engine=self.name)["client_state"]

    def set_layout(self, plan) -> None:
        pass  # the loop feeds plan.grad_accum micro batches; DDP has no batch configuration

    def rescale(self, kappa, rule):
        return rescale_optimizer(self.optimizer, kappa, rule)

    def export_full_state(self) -> dict:
        return full_state(self.module, self.optimizer)


def build(cfg, model: torch.nn.Module, plan) -> DDPEngine:
    """The run config's DDP engine (``train.engine: ddp``): the model on this rank's device, the plan's
    optimizer on its parameters (fp32)."""
    device = torch.device("cuda", torch.cuda.current_device()) if bbdist.default_backend() == "nccl" \
        else torch.device("cpu")
    model.to(device)
    optimizer = build_optimizer(model, plan=plan, optimizer_kwargs=cfg.optim.kwargs,
                                param_groups=param_groups(model, float(cfg.optim.hparams.get("weight_decay", 0.0)),
                                                          no_decay_norms_and_biases=cfg.optim.no_decay_norms_and_biases))
    return DDPEngine(model, optimizer, grad_clip=cfg.optim.grad_clip, device=device)
