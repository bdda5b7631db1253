"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) as a second engine: the model sharded per
Transformer block and at the root, bigbatch's optimizer on the DTensor shards, and checkpoints that
reshard through ``torch.distributed.checkpoint`` (DCP).

* :func:`shard_model`: ``fully_shard`` on each decoder block and the root (one mesh over every rank),
  with bf16 compute and float32 gradient reduction when asked, and the gradient divide factor 1
  (the loop scales the loss by 1 / (micro batches x ranks) itself, so FSDP sums; that fixes the scale
  of what each rank sends, which the noise scale reads).
* :class:`NormedReduceScatter`: FSDP's reduce-scatter, which also adds up the squared norm of what
  each rank sends, its own gradient before the reduction (the gradient noise scale's small batch).
* :func:`save_checkpoint` / :func:`load_checkpoint`: DCP's sharded files in a
  :mod:`~bigbatch.sharding.tags` tag (manifest with hashes, ``latest``, retention, all-or-nothing
  saves); DCP reshards DTensors onto any world size, every optimizer state included (AMSBound's
  ``max_exp_avg_sq``), and the param groups (hyperparameters, AdaBound's ``base_lr``) come back.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from bigbatch import distributed as bbdist
from bigbatch.rng import rng_state
from bigbatch.sharding import tags



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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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

    def take(self) -> float:
        value = 0.0 if self.sq is None else float(self.sq)
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


class FSDPNoiseProbe:
    """The gradient noise scale under FSDP2 (needs >= 2 ranks): each rank's gradient over its whole
    local batch (``micro_batch * grad_accum`` samples, read from the reduce-scatter) against the
    reduced gradient of the step. Same interface as :class:`bigbatch.scaling.NoiseScaleProbe`."""

    def __init__(self, comm: NormedReduceScatter, micro_batch: int, grad_accum: int, estimator):
        self.comm, self.estimator = comm, estimator
        self.set_batch(micro_batch, grad_accum)

    def set_batch(self, micro_batch: int, grad_accum: int) -> None:
        self.local_batch = micro_batch * grad_accum

    def after_backward(self, measure: bool) -> None:
        pass  # the reduce-scatter of the last backward records the norm

    def skip_step(self) -> None:
        self.comm.take()

    def step_done(self, global_sq_norm: float):
        world = bbdist.world_size()
        # the loss was scaled by 1 / (micro batches x ranks) and FSDP sums: what a rank sent is its
        # local mean gradient / world
        local = self.comm.take() * world * world
        return self.estimator.observe_distributed(local, global_sq_norm, self.local_batch, self.local_batch * world)


def save_checkpoint(model, optimizer, ckpt_dir: str, *, tag: str, client_state: dict | None = None,
                    meta: dict | None = None, keep: int | None = None) -> str:
    """Save a ``fully_shard`` model and its optimizer under ``ckpt_dir/tag`` (collective): DCP's
    sharded files, every rank's RNG state, and rank 0's ``meta`` (with ``client_state``). All or
    nothing, as :class:`~bigbatch.sharding.tags.TagSave`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    save = tags.TagSave(ckpt_dir, tag)
    error = None
    try:
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=save.path)
    except Exception as exc:  # DCP raises on every rank when one failed
        error = tags.describe_write_error(exc, save.path) + " (the sharded state)"
    save.check(error)
    rank = bbdist.rank()
    files = [(tags.RNG.format(rank), rng_state())]
    if rank == 0:
        files.append((tags.META, {"format": tags.FORMAT, "tag": tag, "world_size": bbdist.world_size(),
                             **(meta or {}), "client_state": dict(client_state or {})}))
    save.write(files)
    return save.finish(keep=keep, samples=(client_state or {}).get("samples", -1))


def load_checkpoint(model, optimizer, ckpt_dir: str, *, tag: str | None = None, fallback: bool = False) -> dict:
    """Restore a ``fully_shard`` model and its optimizer from ``ckpt_dir`` on any world size
    (collective); return the saved meta (``client_state`` inside). Tags are verified and chosen as
    :func:`bigbatch.sharding.tags.load_first_good` says."""
    return tags.load_first_good(ckpt_dir, tag, fallback, lambda t: _load_tag(model, optimizer, ckpt_dir, t))


def _load_tag(model, optimizer, ckpt_dir: str, tag: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.path.join(ckpt_dir, tag)
    try:
        meta = tags.read_meta(ckpt_dir, tag)
        msd, osd = get_state_dict(model, optimizer)  # templates: the current sharding
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except Exception as exc:
        raise tags.CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    tags.restore_rng(path, bbdist.rank())
    if dist.is_initialized():
        dist.barrier()
    return meta


def full_state(model, optimizer) -> dict:
    """Every parameter's full value and optimizer states, gathered (collective; for tests and
    comparisons): ``{name: {"fp32": tensor, "state": {key: tensor}}}``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for n, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = {"fp32": full.detach().float().cpu(), "state": {}}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                full = v.full_tensor() if hasattr(v, "full_tensor") else v
                out[names[id(p)]]["state"][k] = full.detach().float().cpu()
    return out
