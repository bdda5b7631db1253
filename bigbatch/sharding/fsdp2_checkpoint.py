"""Checkpoints of FSDP2 runs: ``torch.distributed.checkpoint`` (DCP) shards in a
:mod:`~bigbatch.sharding.tags` tag (manifest with hashes, ``latest``, retention, all-or-nothing saves).
DCP reshards DTensors onto any world size, every optimizer state included (AMSBound's
``max_exp_avg_sq``), and the param groups (hyperparameters, AdaBound's ``base_lr``) come back. A
DeepSpeed tag loads too, from its by-name full state (:mod:`bigbatch.sharding.full_state`).

A save can overlap training (``background=True``): ``dcp.async_save`` copies the state to CPU memory
(the only part the caller waits for) and writes it from a thread; a thread of ours then writes the RNG
states and the meta, hashes, and writes the manifest and ``latest`` only after every rank's bytes are
on disk, over a process group of its own (the training's collectives go on meanwhile). A process killed
before that leaves the tag without a manifest: ``latest`` still names the previous complete tag.
"""

from __future__ import annotations

import os
import threading

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from bigbatch import distributed as bbdist
from bigbatch.rng import rng_state
from bigbatch.sharding import tags
from bigbatch.optim.registry import canonical_name
from bigbatch.sharding.full_state import (FullState, IncompatibleCheckpoint, causes, check_compatible,
                                          read_full_state, safe_planner, safe_reader, saved_engine)


class ReusedBufferStager(AsyncStager):
    """``dcp.async_save``'s staging into CPU buffers kept from one save to the next: a copy into
    fresh memory pays its page faults on every save (about half the stall, measured in
    benchmarks/checkpoint_io.py). Costs one copy of the state in host memory; the buffers are
    remade when the state's tensors change shape. The caller waits for a save before the next."""

    _synchronize_after_execute = False

    def __init__(self):
        self.buffers, self.signature = None, None

    def stage(self, state_dict):
        signature = _signature(state_dict)
        if signature != self.signature:
            self.buffers, self.signature = _create_cpu_state_dict(state_dict), signature
        return _copy_state_dict(state_dict, self.buffers)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _signature(obj, path: str = "") -> tuple:
    """(path, local shape, dtype) of every tensor of a nested state dict."""
    if isinstance(obj, dict):
        return tuple(x for k, v in obj.items() for x in _signature(v, f"{path}.{k}"))
    if isinstance(obj, (list, tuple)):
        return tuple(x for i, v in enumerate(obj) for x in _signature(v, f"{path}.{i}"))
    if torch.is_tensor(obj):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return ((path, tuple(local.shape), local.dtype),)
    return ()


def save_checkpoint(model, optimizer, ckpt_dir: str, *, tag: str, client_state: dict | None = None,
                    meta: dict | None = None, keep: int | None = None, background: bool = False,
                    group=None, stager: ReusedBufferStager | None = None):
    """Save a ``fully_shard`` model and its optimizer under ``ckpt_dir/tag`` (collective): DCP's
    sharded files, every rank's RNG state, and rank 0's ``meta`` (with ``client_state``). All or
    nothing, as :class:`~bigbatch.sharding.tags.TagSave`. Returns the tag's path, or with
    ``background`` a :class:`PendingSave` (then ``group`` must be a gloo group of every rank that only
    checkpoints use; ``stager``: the :class:`ReusedBufferStager` kept between saves)."""
    save = tags.TagSave(ckpt_dir, tag, group=group if background else None)
    rank = bbdist.rank()
    files = [(tags.RNG.format(rank), rng_state())]
    if rank == 0:
        files.append((tags.META, {"format": tags.FORMAT, "tag": tag, "engine": "fsdp2",
                                  "world_size": bbdist.world_size(), **(meta or {}),
                                  "client_state": dict(client_state or {})}))
    order = {"samples": (client_state or {}).get("samples", -1)}
    error, future = None, None
    try:
        msd, osd = get_state_dict(model, optimizer)
        if background:  # returns once the state is copied to CPU memory
            future = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=save.path, process_group=group,
                                    async_stager=stager)
        else:
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=save.path)
    except Exception as exc:  # DCP raises on every rank when one failed
        error = tags.describe_write_error(exc, save.path) + " (the sharded state)"
    if background:  # DCP's thread now uses ``group``: agree over the training's
        if errors := bbdist.agree(error):
            raise save.failed(errors)
        return PendingSave(save, future, files, keep, order)
    save.check(error)
    save.write(files)
    return save.finish(keep=keep, **order)


class PendingSave:
    """A tag being completed in a background thread: DCP's write (``future``), then our files, the
    hashes, the manifest, ``latest`` and the retention (:class:`~bigbatch.sharding.tags.TagSave` over
    its own group). :meth:`wait` joins it and raises its
    :class:`~bigbatch.sharding.tags.CheckpointSaveError`, if any."""

    def __init__(self, save: tags.TagSave, future, files: list, keep: int | None, order: dict):
        self.save, self.error = save, None
        self.thread = threading.Thread(target=self._complete, args=(future, files, keep, order),
                                       name=f"bigbatch-save-{save.tag}", daemon=True)
        self.thread.start()

    def _complete(self, future, files, keep, order) -> None:
        try:
            error = None
            try:
                future.result()
            except Exception as exc:  # DCP's writer failed on this rank (a full disk, ...)
                error = tags.describe_write_error(exc, self.save.path) + " (the sharded state)"
            self.save.check(error)
            self.save.write(files)
            self.save.finish(keep=keep, **order)
        except Exception as exc:
            self.error = exc if isinstance(exc, tags.CheckpointSaveError) else tags.CheckpointSaveError(
                f"checkpoint {self.save.tag!r}: {type(exc).__name__}: {exc}")

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self) -> str:
        """The tag's path once complete (every rank's bytes on disk, hashed, ``latest`` moved)."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.save.path


def load_checkpoint(model, optimizer, ckpt_dir: str, *, tag: str | None = None, fallback: bool = False,
                    engine: str = "fsdp2") -> dict:
    """Restore a ``fully_shard`` model and its optimizer from ``ckpt_dir`` on any world size
    (collective); return the saved meta (``client_state`` inside). Tags are verified and chosen as
    :func:`bigbatch.sharding.tags.load_first_good` says."""
    return tags.load_first_good(ckpt_dir, tag, fallback, lambda t: _load_tag(model, optimizer, ckpt_dir, t, engine))


def _load_tag(model, optimizer, ckpt_dir: str, tag: str, engine: str) -> dict:
    path = os.path.join(ckpt_dir, tag)
    try:
        meta = tags.read_meta(ckpt_dir, tag)
        if saved_engine(meta) == "deepspeed":  # DeepSpeed's parts: from the tag's by-name full state
            fs = read_full_state(ckpt_dir, tag, meta=meta)
            names = {id(p): n for n, p in model.named_parameters()}
            check_compatible(fs, [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
                             canonical_name(type(optimizer)), engine)
            load_full_state(model, optimizer, fs)
        else:
            msd, osd = get_state_dict(model, optimizer)  # templates: the current sharding
            state = {"model": msd, "optim": osd}
            dcp.load(state, storage_reader=safe_reader(path), planner=safe_planner(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (tags.CheckpointError, IncompatibleCheckpoint):
        raise
    except (Exception, CheckpointException) as exc:  # DCP's wrapper of every rank's failure is a BaseException
        for inner in causes(exc):
            if isinstance(inner, tags.CheckpointError):
                raise inner from None
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
