"""Full (unsharded) per-parameter fp32 weights and optimizer states of a DeepSpeed engine.

The same code serves ZeRO stages 0-3 and DeepSpeed's bf16 optimizer:

* stage 0 (fp32): the client optimizer holds the model parameters themselves;
* stages 1/2 and bf16: the client optimizer's ``param_groups`` were narrowed to one flat fp32
  partition per group; each model parameter links to its slice through ``_hp_mapping``
  (``deepspeed.utils.tensor_fragment``), whose optimizer-state links are made lazily after the
  first step;
* stage 3: each parameter is partitioned on its own (``ds_tensor``, padded at the end) and the
  optimizer holds flat fp32 sub-group partitions; ``grad_position`` locates a parameter in them.

Every state tensor shaped like its flat partition is carried (``exp_avg``, ``exp_avg_sq`` and
AMSBound's ``max_exp_avg_sq`` alike): nothing is dropped by name. ``step`` is a 0-d tensor per
flat partition and is carried per optimizer group.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from bigbatch.distributed import all_reduce_floats, rank
from bigbatch.scaling.rescale import rescale_param_groups, rescale_scheduler, rescale_second_moments

logger = logging.getLogger(__name__)


def stage_of(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


def _is_z3(p) -> bool:
    return hasattr(p, "ds_id")


def named_trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def lp_groups(engine) -> list[tuple[int, list[torch.nn.Parameter]]]:
    """``(client-optimizer group index, model parameters)`` per flat partition."""
    opt = engine.optimizer
    if stage_of(engine) == 3:  # sub-groups of at most sub_group_size elements each
        return [(opt.sub_group_to_group_id[s], list(g)) for s, g in enumerate(opt.fp16_groups)]
    for attr in ("bit16_groups", "bf16_groups"):  # ZeRO-1/2, bf16 optimizer
        groups = getattr(opt, attr, None)
        if groups is not None and hasattr(opt, "optimizer"):
            return [(i, list(g)) for i, g in enumerate(groups)]
    return [(i, list(g["params"])) for i, g in enumerate(engine.basic_optimizer.param_groups)]


def state_owners(engine) -> list[tuple[int, torch.Tensor]]:
    """``(group index, tensor keying the client optimizer's state)`` for every local partition.

    ZeRO-3 empties the client optimizer's ``params`` between steps, so its flat fp32 sub-group
    partitions are taken from the wrapper instead.
    """
    opt = engine.optimizer
    if stage_of(engine) == 3:
        return [(opt.sub_group_to_group_id[s], t) for s, t in enumerate(opt.fp32_partitioned_groups_flat)]
    return [(i, p) for i, g in enumerate(engine.basic_optimizer.param_groups) for p in g["params"]]


def group_index_by_name(engine) -> dict[str, int]:
    ids = {id(p): i for i, g in lp_groups(engine) for p in g}
    return {n: ids[id(p)] for n, p in named_trainable(engine) if id(p) in ids}


def state_keys(engine) -> list[str]:
    """Names of the per-element optimizer states (those shaped like their parameter), all ranks."""
    keys: set[str] = set()
    for owner, st in engine.basic_optimizer.state.items():
        keys |= {k for k, v in st.items() if torch.is_tensor(v) and v.shape == owner.shape and v.dim() > 0}
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(keys))
        keys = set().union(*map(set, gathered))
    return sorted(keys)


def group_steps(engine) -> list[float | None]:
    """``step`` of each client-optimizer group (None before its first step)."""
    state = engine.basic_optimizer.state
    steps: list[float | None] = [None] * len(engine.basic_optimizer.param_groups)
    for g, owner in state_owners(engine):
        if "step" in state.get(owner, {}):
            v = float(state[owner]["step"])
            steps[g] = v if steps[g] is None else max(steps[g], v)
    # a rank may hold no state for a group
    reduced = all_reduce_floats([-1.0 if s is None else s for s in steps], "max")
    steps = [None if v < 0 else float(v) for v in reduced]
    return steps


def set_group_steps(engine, steps: list[float | None]) -> None:
    state = engine.basic_optimizer.state
    for g, owner in state_owners(engine):
        if steps[g] is not None and "step" in state.get(owner, {}):
            state[owner]["step"].fill_(float(steps[g]))


def _link(engine) -> None:
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def get_full(engine, param, key: str | None) -> torch.Tensor:
    """Full fp32 value of ``param`` (key None) or of its optimizer state ``key``; collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _is_z3(param) or hasattr(param, "_hp_mapping"):
        out = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        return out.detach().float().cpu().clone()
    if key is None:
        return param.detach().float().cpu().clone()
    return engine.basic_optimizer.state[param][key].detach().float().cpu().clone()


def _z3_local(param, value: torch.Tensor, optimizer) -> torch.Tensor:
    """This rank's padded slice of a full value for a ZeRO-3 parameter."""
    n = param.ds_tensor.numel()
    rank = optimizer._get_param_partition_rank(param)
    flat = value.reshape(-1).float()
    start = n * rank
    piece = flat[start:start + n]
    if piece.numel() < n:
        piece = torch.cat([piece, piece.new_zeros(n - piece.numel())])
    return piece


def set_full(engine, param, key: str | None, value: torch.Tensor) -> None:
    """Write a full fp32 value into this rank's shard of ``param`` or of its state ``key``.

    With ``key`` None the model (low-precision) copy is updated as well, so forward sees it.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state, \
        safe_set_local_fp32_param, safe_set_local_optimizer_state

    value = value.to(torch.float32)
    if tuple(value.shape) != tuple(getattr(param, "ds_shape", param.shape)):
        raise ValueError(f"shape mismatch for a parameter: checkpoint {tuple(value.shape)} vs model "
                         f"{tuple(getattr(param, 'ds_shape', param.shape))}")
    if _is_z3(param):
        local = _z3_local(param, value, param._z3_optimizer)
        if key is None:
            safe_set_local_fp32_param(param, local)
            param.ds_tensor.data.copy_(local.to(param.ds_tensor.dtype))
        else:
            safe_set_local_optimizer_state(param, local, key)
        return
    if hasattr(param, "_hp_mapping"):
        if key is None:
            param.data.copy_(value.to(param.dtype))  # stages 1/2 keep the full model copy on every rank
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    if key is None:
        param.data.copy_(value.to(param.dtype))
    else:
        engine.basic_optimizer.state[param][key].copy_(value)


def ensure_state(engine, keys: list[str], steps: list[float | None]) -> None:
    """Create zero optimizer states (and set ``step``) for every flat partition, then link fragments.

    A fresh engine has no optimizer state until its first step; resharding writes into it.
    """
    state = engine.basic_optimizer.state
    for g, p in state_owners(engine):
        if steps[g] is None:
            continue
        st = state[p]
        for k in keys:
            if k not in st:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] = torch.tensor(float(steps[g]), dtype=torch.float32)
    _link(engine)


def prepare_read(engine) -> None:
    """Link fragment views of the optimizer state (DeepSpeed does this lazily)."""
    if engine.basic_optimizer.state:
        _link(engine)


def gather_full_state(engine, *, with_optimizer: bool = True, keep=None) -> dict:
    """``{name: {"fp32": tensor, "state": {key: tensor}, "group": int}}``: full fp32 tensors on CPU.

    Collective: all ranks call it and every parameter is assembled on every rank, one at a time;
    ``keep(index)`` (parameter index in ``named_parameters`` order) selects which ones this rank
    keeps, so ranks can split the saving (each holds about 1/N of the full state).
    """
    prepare_read(engine)
    keys = state_keys(engine) if with_optimizer else []
    groups = group_index_by_name(engine)
    out = {}
    for i, (name, p) in enumerate(named_trainable(engine)):
        entry = {"fp32": get_full(engine, p, None), "state": {}, "group": groups.get(name)}
        for k in keys:
            entry["state"][k] = get_full(engine, p, k)
        if keep is None or keep(i):
            out[name] = entry
    return out


def scatter_full_state(engine, full: dict, steps_by_name: dict[str, float | None], *,
                       with_optimizer: bool = True) -> None:
    """Write a :func:`gather_full_state` result (from any world size or stage) into ``engine``."""
    names = dict(named_trainable(engine))
    missing = sorted(set(names) - set(full))
    extra = sorted(set(full) - set(names))
    if missing or extra:
        raise ValueError(f"checkpoint parameters do not match the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    if with_optimizer:
        keys = sorted({k for e in full.values() for k in e["state"]})
        groups = group_index_by_name(engine)
        n_groups = len(engine.basic_optimizer.param_groups)
        steps: list[float | None] = [None] * n_groups
        for name, g in groups.items():
            s = steps_by_name.get(name)
            if s is not None:
                steps[g] = s if steps[g] is None else max(steps[g], s)
        ensure_state(engine, keys, steps)
    for name, p in names.items():
        set_full(engine, p, None, full[name]["fp32"])
        if with_optimizer:
            for k, v in full[name]["state"].items():
                set_full(engine, p, k, v)


def scale_step_counters(engine, kappa: float) -> dict:
    """The step counters of ZeRO's partitions become ``step / kappa`` (the same samples seen at a
    batch ``kappa`` times larger); the scheduler's ``last_epoch`` and the engine's ``global_steps``
    are converted the same way (rounded). Returns the old and new values."""
    report = {}
    groups = engine.basic_optimizer.param_groups
    moved = rescale_scheduler(engine.lr_scheduler, [1.0] * len(groups), groups, kappa=kappa)
    if moved is not None:
        report["scheduler_last_epoch"] = moved
    steps = group_steps(engine)
    new_steps = [None if s is None else s / kappa for s in steps]
    set_group_steps(engine, new_steps)
    report["steps"] = (steps, new_steps)
    old_gs = engine.global_steps
    engine.global_steps = int(round(old_gs / kappa))
    report["global_steps"] = (old_gs, engine.global_steps)
    return report


def rescale_engine(engine, kappa: float, rule, *, log: bool = True) -> dict:
    """Move a restored run to a global batch ``kappa`` times the saved one by ``rule`` (a
    :class:`~bigbatch.scaling.rules.ScalingRule`): hyperparameters, base
    lrs, the scheduler's base lrs and the second moments of ZeRO's partitions as
    :mod:`bigbatch.scaling.rescale` describes, then :func:`scale_step_counters`. Returns the new
    values (``lr_ratios``: new / old lr per group) and, with ``log``, logs them."""
    groups = engine.basic_optimizer.param_groups
    moved = rescale_second_moments(engine.basic_optimizer, kappa, rule)  # first: it reads the old betas
    report = rescale_param_groups(groups, kappa, rule)
    report["second_moments"] = moved
    rescale_scheduler(engine.lr_scheduler, report["lr_ratios"], groups, kappa=None)
    report.update(scale_step_counters(engine, kappa))
    if log and rank() == 0:
        logger.warning("bigbatch: global batch changed by kappa=%.6g; rescaled hyperparameters %s; "
                       "step counters %s -> %s; global_steps %s", kappa, report["groups"], *report["steps"],
                       report["global_steps"])
    return report
