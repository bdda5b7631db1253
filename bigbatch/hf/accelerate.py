"""Accelerate: its process state with the right backend on CPU hosts, and our optimizer as the client
optimizer of its DeepSpeed plugin.

**The process state** takes the backend DeepSpeed's accelerator uses. Why: ``accelerate.PartialState._prepare_backend`` (accelerate 1.15) picks a backend only for a device
it finds (nccl for CUDA, ...), or gloo/mpi when ``cpu=True``. Under ``torchrun`` on a host without an
accelerator and with DeepSpeed on (``cpu=False``, as DeepSpeed requires), it returns backend ``None``;
DeepSpeed then initializes the gloo group itself, but ``PartialState`` sees ``backend is None`` and sets
``num_processes = 1``. ``TrainingArguments.world_size`` reads that 1, HF fills ``train_batch_size =
1 x micro x accum`` and DeepSpeed, which sees the real group, refuses it ("4 != 4 * 1 * 2").
``transformers.TrainingArguments._setup_devices`` does not forward ``ddp_backend`` when ``deepspeed``
is set, so no Trainer argument reaches the fix. Passing the backend explicitly to ``PartialState``
is accelerate's supported way; the Trainer reuses such a state with
``accelerator_config={"use_configured_state": True}``. Without DeepSpeed the same loss happens
(``accelerate launch --multi_gpu`` on a CPU host: every process trains alone); there the state is
built with ``cpu=True``, accelerate's multi-CPU (gloo DDP) path.

**The DeepSpeed plugin.** ``accelerate`` refuses a client optimizer when the plugin's DeepSpeed config has
an ``"optimizer"`` block, and DeepSpeed does not know ours; :func:`take_optimizer_block` takes our block
out of the active plugin's config (in place: the plugin and its ``hf_ds_config`` share the dict) so the
script builds the optimizer itself. Call :func:`init_distributed_state` before ``Accelerator()`` so the
world size is right on CPU hosts.
"""

from __future__ import annotations

import os

import torch

from bigbatch.distributed import deepspeed_without_shm
from bigbatch.hf.deepspeed import OptimizerBlock, split_optimizer_block


def _launched() -> bool:
    return int(os.environ.get("LOCAL_RANK", "-1")) != -1


def needs_backend_fix() -> bool:
    """True where accelerate would lose the world size: a launched process with no device backend."""
    if not _launched():
        return False
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu" and not torch.cuda.is_available()


def init_distributed_state(*, use_deepspeed: bool):
    """Create accelerate's ``PartialState`` with DeepSpeed's communication backend (gloo on CPU).

    Call it before ``Accelerator(...)`` (Accelerate scripts) or let :class:`BigBatchTrainingArguments`
    call it. Returns the state, or ``None`` where accelerate already finds the backend itself (GPU
    hosts, single unlaunched process): nothing is changed there.
    """
    if use_deepspeed:
        deepspeed_without_shm()
    if not needs_backend_fix():
        return None
    from accelerate.state import AcceleratorState, PartialState
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().communication_backend_name()
    AcceleratorState._reset_state(reset_partial_state=True)  # what the Trainer does before building its own
    flag = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true" if use_deepspeed else "false"
    try:
        # Without DeepSpeed, cpu=True is accelerate's own multi-CPU path (gloo DDP); DeepSpeed needs cpu=False
        # (accelerate turns it off otherwise), hence the explicit backend.
        state = PartialState(backend=backend) if use_deepspeed else PartialState(cpu=True, backend=backend)
    finally:
        if flag is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = flag
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if state.num_processes != world:
        raise RuntimeError(f"accelerate state has num_processes={state.num_processes} but the process group has "
                           f"world_size={world} (backend {backend!r})")
    return state


def take_optimizer_block(accelerator, optimizer_name: str | None = None) -> OptimizerBlock | None:
    """Remove our optimizer block from the accelerator's DeepSpeed config and return it.

    ``None`` without DeepSpeed or when the config has no block of ours (``"type": "auto"`` takes
    ``optimizer_name``). Raises ``DSConfigError`` naming the bad field.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    cfg, block = split_optimizer_block(plugin.deepspeed_config, optimizer_name)
    if block is not None:
        plugin.deepspeed_config.clear()
        plugin.deepspeed_config.update(cfg)
    return block


def decay_groups(model, weight_decay: float, no_decay=("bias", "norm")) -> list[dict]:
    """Two parameter groups as the HF Trainer makes them: decay, and no decay for biases and norms."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if any(k in name.lower() for k in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
