"""Accelerate's process state with the backend DeepSpeed's accelerator uses (the CPU DeepSpeed fix).

Why: ``accelerate.PartialState._prepare_backend`` (accelerate 1.15) picks a backend only for a device
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
"""

from __future__ import annotations

import os

import torch


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
