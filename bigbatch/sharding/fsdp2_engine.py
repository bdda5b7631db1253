"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) as a
:class:`~bigbatch.sharding.training_engine.TrainingEngine`: the model sharded per Transformer block and
at the root, bigbatch's optimizer on the DTensor shards (its states are made with ``zeros_like``, so
they are DTensors placed like the parameters); checkpoints in :mod:`bigbatch.sharding.fsdp2_checkpoint`.

* :func:`shard_model`: ``fully_shard`` on each decoder block and the root (one mesh over every rank),
  with bf16 compute and float32 gradient reduction when asked, and the gradient divide factor 1
  (the loop scales the loss by 1 / (micro batches x ranks) itself, so FSDP sums; that fixes the scale
  of what each rank sends, which the noise scale reads).
* :class:`NormedReduceScatter`: FSDP's reduce-scatter, which also adds up the squared norm of what
  each rank sends, its own gradient before the reduction (the gradient noise scale's small batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from bigbatch import distributed as bbdist
from bigbatch.scaling.noise_scale import FSDPNoiseProbe
from bigbatch.optim.registry import canonical_name
from bigbatch.scaling.rescale import rescale_optimizer
from bigbatch.sharding import tags
from bigbatch.sharding.fsdp2_checkpoint import ReusedBufferStager, full_state, load_checkpoint, save_checkpoint
from bigbatch.errors import ConfigError
from bigbatch.sharding.optimizer import build_optimizer, param_groups, step_if_finite
from bigbatch.sharding.training_engine import StepOutput, TrainingEngine, mean_loss


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated Transformer blocks of an HF causal LM (Llama ``model.layers``, GPT-2
    ``transformer.h``); empty for other models (only the root is sharded then)."""
    for path in ("model.layers", "transformer.h", "layers"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, torch.nn.ModuleList):
            return list(node)
    return []


def shard_model(model: torch.nn.Module, *, device_type: str = "cpu", precision: str = "fp32",
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` every decoder block and the root on a 1-D mesh of all ranks (in place)."""
    mesh = init_device_mesh(device_type, (bbdist.world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    modules = decoder_blocks(model) + [model]
    for m in modules:
        fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for m in modules:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


try:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter as _ReduceScatter
except ImportError:  # a torch without custom reduce-scatter: no noise-scale measurement under FSDP2
    _ReduceScatter = None


class NormedReduceScatter(_ReduceScatter or object):
    """FSDP's default reduce-scatter that adds up ``|input|^2`` (float64, on the input's device):
    the squared norm of this rank's gradient before the reduction (padding is zeros)."""

    def __init__(self):
        self.sq: torch.Tensor | None = None

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        sq = torch.linalg.vector_norm(input_tensor.detach(), dtype=torch.float64).square()
        self.sq = sq if self.sq is None else self.sq + sq
        return super().__call__(output_tensor, input_tensor, group, op, async_op)

    def take(self) -> torch.Tensor:
        """The squared norm sent since the last call (float64 scalar tensor; nothing is read)."""
        value = torch.zeros((), dtype=torch.float64) if self.sq is None else self.sq
        self.sq = None
        return value


def install_normed_reduce_scatter(model: torch.nn.Module) -> NormedReduceScatter | None:
    """One :class:`NormedReduceScatter` on every FSDP module of ``model``; None where unavailable."""
    if _ReduceScatter is None:
        return None
    comm = NormedReduceScatter()
    for m in model.modules():
        if hasattr(m, "set_custom_reduce_scatter"):
            m.set_custom_reduce_scatter(comm)
    return comm


class FSDP2Engine(TrainingEngine):
    """A ``fully_shard`` model (:func:`shard_model`) and bigbatch's optimizer on its shards."""

    name = "fsdp2"

    def __init__(self, model, optimizer, *, precision: str, grad_clip: float, async_save: bool = False):
        self.module, self.optimizer = model, optimizer
        self.precision = precision
        self.grad_clip = grad_clip
        self.comm = install_normed_reduce_scatter(model)
        # saves that complete in the background talk over a group of their own (collective: made here,
        # where every rank builds its engine)
        self.save_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.async_save = async_save
        self.pending, self.stager = None, ReusedBufferStager()

    def noise_measurable(self, plan) -> bool:
        """Each rank's local batch against the global one: needs >= 2 ranks."""
        return plan.world_size >= 2 and self.comm is not None

    def noise_probe(self, plan, estimator):
        return FSDPNoiseProbe(self.comm, plan.micro_batch, plan.grad_accum, estimator)

    def train_step(self, micro_batches, device, after_backward=None, weights=None) -> StepOutput:
        """Gradients of the micro batches accumulate unreduced (no sync) and are reduce-scattered with
        the last; the loss is scaled by 1 / (micro batches x ranks) and FSDP sums, so the shards hold
        the global mean gradient. Clipping on the DTensor gradients (the global norm is torch's one
        all-reduce); a non-finite norm skips the step on every rank (they all see the same norm)."""
        n = len(micro_batches)
        scale = 1.0 / (n * bbdist.world_size())
        losses = []
        for i, x in enumerate(micro_batches):
            self.module.set_requires_gradient_sync(i == n - 1)
            x = x.to(device)
            loss = self.module(input_ids=x, labels=x).loss
            (loss * (scale if weights is None else scale * weights[i])).backward()
            if after_backward is not None:
                after_backward()
            losses.append(loss)
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
        """float32 weights and two or three moments."""
        return 16 * sum(p.numel() for p in self.module.parameters())

    def save(self, ckpt_dir, *, tag, client_state, keep=None, background=False):
        """With ``background`` (and ``fsdp2``'s ``async_save``): returns once the state is copied to
        memory; the tag completes while training goes on (:meth:`wait_saves`). A failure of the
        previous background save is raised here, after this save started."""
        earlier = None
        try:
            self.wait_saves()
        except tags.CheckpointSaveError as exc:
            earlier = exc
        background = background and self.async_save and self.save_group is not None
        meta = {"global_batch": client_state.get("global_batch"), "optimizer": canonical_name(type(self.optimizer))}
        result = save_checkpoint(self.module, self.optimizer, ckpt_dir, tag=tag, client_state=client_state,
                                 meta=meta, keep=keep, background=background, group=self.save_group,
                                 stager=self.stager)
        if background:
            self.pending = result
        if earlier is not None:
            raise earlier

    def wait_saves(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.wait()

    def load_newest(self, ckpt_dir, tag=None):
        """Through DCP, on any world size."""
        return load_checkpoint(self.module, self.optimizer, ckpt_dir, tag=tag, fallback=tag is None)["client_state"]

    def set_layout(self, plan) -> None:
        pass  # the loop feeds plan.grad_accum micro batches; FSDP2 has no batch configuration

    def rescale(self, kappa, rule):
        return rescale_optimizer(self.optimizer, kappa, rule)

    def export_full_state(self) -> dict:
        return full_state(self.module, self.optimizer)


def build(cfg, model: torch.nn.Module, plan) -> FSDP2Engine:
    """The run config's FSDP2 engine (``train.engine: fsdp2``): ``fully_shard`` the model (blocks and
    root), then the plan's optimizer on its shards."""
    f = cfg.fsdp2
    device_type = "cuda" if bbdist.default_backend() == "nccl" else "cpu"
    if device_type == "cuda":
        model.to(torch.device("cuda", torch.cuda.current_device()))
    if f.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_model(model, device_type=device_type, precision=f.precision, reshard_after_forward=f.reshard_after_forward)
    optimizer = build_optimizer(model, plan=plan, optimizer_kwargs=cfg.optim.kwargs,
                                param_groups=param_groups(model, float(cfg.optim.hparams.get("weight_decay", 0.0)),
                                                          no_decay_norms_and_biases=cfg.optim.no_decay_norms_and_biases))
    return FSDP2Engine(model, optimizer, precision=f.precision, grad_clip=cfg.optim.grad_clip,
                       async_save=cfg.checkpoint.async_save)


def check(cfg, world_size: int) -> None:
    """FSDP2 measures the noise scale across ranks only: an automatic batch schedule needs >= 2."""
    if cfg.batch.schedule == "auto" and world_size < 2:
        raise ConfigError("batch.schedule: auto needs the gradient noise scale, which train.engine fsdp2 measures "
                          "only across >= 2 processes (one process: use the deepspeed or ddp engine, which split a "
                          "step into micro batches)")
