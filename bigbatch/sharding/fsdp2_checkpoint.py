"""Checkpoints of FSDP2 runs: ``torch.distributed.checkpoint`` (DCP) shards in a
:mod:`~bigbatch.sharding.tags` tag (manifest with hashes, ``latest``, retention, all-or-nothing saves).
DCP reshards DTensors onto any world size, every optimizer state included (AMSBound's
``max_exp_avg_sq``), and the param groups (hyperparameters, AdaBound's ``base_lr``) come back.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from bigbatch import distributed as bbdist
from bigbatch.rng import rng_state
from bigbatch.sharding import tags
from bigbatch.optim.registry import canonical_name
from bigbatch.sharding.full_state import FullState, IncompatibleCheckpoint, check_compatible, read_full_state, saved_engine


def save_checkpoint(model, optimizer, ckpt_dir: str, *, tag: str, client_state: dict | None = None,
                    meta: dict | None = None, keep: int | None = None) -> str:
    """Save a ``fully_shard`` model and its optimizer under ``ckpt_dir/tag`` (collective): DCP's
    sharded files, every rank's RNG state, and rank 0's ``meta`` (with ``client_state``). All or
    nothing, as :class:`~bigbatch.sharding.tags.TagSave`."""
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
        files.append((tags.META, {"format": tags.FORMAT, "tag": tag, "engine": "fsdp2",
                                  "world_size": bbdist.world_size(), **(meta or {}),
                                  "client_state": dict(client_state or {})}))
    save.write(files)
    return save.finish(keep=keep, samples=(client_state or {}).get("samples", -1))


def load_checkpoint(model, optimizer, ckpt_dir: str, *, tag: str | None = None, fallback: bool = False) -> dict:
    """Restore a ``fully_shard`` model and its optimizer from ``ckpt_dir`` on any world size
    (collective); return the saved meta (``client_state`` inside). Tags are verified and chosen as
    :func:`bigbatch.sharding.tags.load_first_good` says."""
    return tags.load_first_good(ckpt_dir, tag, fallback, lambda t: _load_tag(model, optimizer, ckpt_dir, t))


def _load_tag(model, optimizer, ckpt_dir: str, tag: str) -> dict:
    path = os.path.join(ckpt_dir, tag)
    try:
        meta = tags.read_meta(ckpt_dir, tag)
        if saved_engine(meta) != "fsdp2":  # another engine's tag: from its by-name full state
            fs = read_full_state(ckpt_dir, tag, meta=meta)
            names = {id(p): n for n, p in model.named_parameters()}
            check_compatible(fs, [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
                             canonical_name(type(optimizer)), "fsdp2")
            load_full_state(model, optimizer, fs)
        else:
            msd, osd = get_state_dict(model, optimizer)  # templates: the current sharding
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (tags.CheckpointError, IncompatibleCheckpoint):
        raise
    except Exception as exc:
        raise tags.CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    tags.restore_rng(path, bbdist.rank())
    if dist.is_initialized():
        dist.barrier()
    return meta


def load_full_state(model, optimizer, fs: FullState) -> None:
    """Load a :class:`~bigbatch.sharding.full_state.FullState` (any engine's, any world size) into a
    ``fully_shard`` model and its optimizer (collective: every rank passes the full tensors and keeps
    its shard): weights, buffers, every optimizer state, per-parameter steps and the param groups'
    hyperparameters."""
    canonical = {}  # state-dict key -> the parameter's first name (tied weights share one)
    first = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        canonical[n] = first.setdefault(id(p), n)
    template = model.state_dict()
    msd = {}
    for key, value in template.items():
        name = canonical.get(key, key)
        if name in fs.params:
            msd[key] = fs.params[name]
        else:
            for kind in ("state", "buffer", "frozen"):
                if f"{kind}:{key}" in fs.extras:
                    msd[key] = fs.extras[f"{kind}:{key}"]
                    break
            else:
                raise tags.CheckpointError(f"{key}: not in the {fs.engine} checkpoint (another model?)")
    names = [n for g in fs.groups for n in g["params"]]
    state = {}
    for n in names:
        entry = {k: v.float() for k, v in fs.optim.get(n, {}).items()}
        if fs.steps_by_name.get(n) is not None:
            entry["step"] = torch.tensor(float(fs.steps_by_name[n]), dtype=torch.float32)
        if entry:
            state[n] = entry
    osd = {"state": state, "param_groups": [{**g["hparams"], "params": list(g["params"])} for g in fs.groups]}
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))


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
