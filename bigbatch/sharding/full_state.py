"""The consolidated, by-name state of a checkpoint tag, whichever engine saved it, read in one CPU
process without the saving world (no process group needed).

:func:`read_full_state` returns a :class:`FullState`: every trainable parameter's full float32 value
and its per-element optimizer states by parameter name (``exp_avg``, ``exp_avg_sq``, AMSBound's
``max_exp_avg_sq``, ...), the step counter of each parameter, the optimizer's param groups (every
hyperparameter, AdaBound's ``base_lr`` included, with the names of their parameters), buffers and
frozen weights, and the tag's meta (client state, batch, optimizer name). The DeepSpeed engine resumes
an FSDP2 tag from it, the FSDP2 engine a DeepSpeed tag, and ``bigbatch export`` reads it.

* DeepSpeed tags (:mod:`~bigbatch.sharding.deepspeed_checkpoint`): the parts
  ``bigbatch_full_state_part<r>.pt`` (memory-mapped), with steps and groups from the meta;
* FSDP2 and DDP tags (:mod:`~bigbatch.sharding.fsdp2_checkpoint`): torch.distributed.checkpoint's
  files, read into full tensors by DCP's own planner without a process group.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field

import torch

from bigbatch.sharding import tags

FULL = "bigbatch_full_state_part{}.pt"  # DeepSpeed tags: rank r's share of the by-name full state
ENGINES = ("deepspeed", "fsdp2", "ddp")


class IncompatibleCheckpoint(ValueError):
    """A tag that the engine resuming it cannot take (another model, optimizer or grouping); the
    message is one line naming the engine, the tag and why."""


@dataclass
class FullState:
    """A tag's state by parameter name (float32 CPU tensors, full shapes).

    Attributes:
        params: ``{name: weight}`` of every trainable parameter (the optimizer's).
        optim: ``{name: {state key: tensor shaped like the weight}}``.
        steps_by_name: ``{name: optimizer step count}`` (None before the parameter's first step).
        groups: the optimizer's param groups in order: ``{"hparams": {...}, "params": [names]}``.
        extras: ``{"buffer:<name>" | "frozen:<name>" | "state:<key>": tensor}``: buffers, frozen
            weights, and (FSDP2 tags) the other keys of the model's state dict.
        meta: the tag's meta (``client_state``, ``global_batch``, ``optimizer``, ...).
        engine: the engine that saved it (``deepspeed``, ``fsdp2``, ``ddp``).
    """

    params: dict[str, torch.Tensor]
    optim: dict[str, dict[str, torch.Tensor]]
    steps_by_name: dict[str, float | None]
    groups: list[dict]
    meta: dict
    engine: str
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def group_by_name(self) -> dict[str, int]:
        return {n: i for i, g in enumerate(self.groups) for n in g["params"]}


def saved_engine(meta: dict) -> str:
    """The engine that saved a tag: its meta's ``engine``, else (tags written before the meta said so)
    DeepSpeed when the meta has a ZeRO stage."""
    if meta.get("engine") in ENGINES:
        return meta["engine"]
    return "deepspeed" if "zero_stage" in meta else "fsdp2"


def read_full_state(ckpt_dir: str, tag: str, *, meta: dict | None = None, weights_only: bool = False) -> FullState:
    """The consolidated state of ``ckpt_dir/tag`` (see the module docstring); CheckpointError naming
    the file when a file cannot be read. Does not verify hashes (:func:`bigbatch.sharding.tags.verify_tag`).
    ``weights_only``: the model's weights and buffers (``params`` then holds the model's whole state
    dict under FSDP2, whose optimizer entries are not read); no optimizer state, steps or groups."""
    meta = tags.read_meta(ckpt_dir, tag) if meta is None else meta
    path = os.path.join(ckpt_dir, tag)
    if saved_engine(meta) == "deepspeed":
        return _read_deepspeed(path, meta)  # memory-mapped: the states cost nothing unless touched
    return _read_dcp(path, meta, weights_only)


def read_parts(path: str, parts: int) -> tuple[dict, dict]:
    """Merge a DeepSpeed tag's full-state parts (memory-mapped): ``({name: {"fp32", "state", "group"}},
    extras)``."""
    params, extras = {}, {}
    for r in range(parts):
        blob = tags.load_file(os.path.join(path, FULL.format(r)), mmap=True)
        params.update(blob["params"])
        extras.update(blob["extras"])
    return params, extras


def _read_deepspeed(path: str, meta: dict) -> FullState:
    entries, extras = read_parts(path, meta["full_state_parts"])
    by_name = meta["group_by_name"]
    groups = [{"hparams": dict(h), "params": [n for n in entries if by_name.get(n) == i]}
              for i, h in enumerate(meta["group_hparams"])]
    return FullState(params={n: e["fp32"] for n, e in entries.items()},
                     optim={n: dict(e["state"]) for n, e in entries.items()},
                     steps_by_name={n: meta["steps_by_name"].get(n) for n in entries},
                     groups=groups, meta=meta, engine="deepspeed", extras=extras)


# What a DCP ``.metadata`` pickle may name: DCP's own metadata classes and the torch types they hold.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = {(_DCP_METADATA, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                             "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                             "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file with nothing but :data:`_DCP_GLOBALS` and torch dtypes
    callable: DCP's own reader uses ``pickle.load``, which runs whatever the file names."""

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


DCP_METADATA = ".metadata"  # DCP's index of a sharded checkpoint (a plain pickle)


def dcp_metadata_globals(file: str) -> list[str]:
    """What a DCP ``.metadata`` file names beyond its own classes (empty when it loads as plain data)."""
    try:
        with open(file, "rb") as fh:
            _MetadataUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        return [str(exc) or "a function"]
    except Exception:  # unreadable: its load says why
        return []
    return []


def safe_reader(path: str):
    """A ``FileSystemReader`` of the DCP directory ``path`` whose ``.metadata`` is unpickled with only
    DCP's metadata classes allowed (CheckpointError naming the file otherwise)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            file = os.path.join(str(self.path), DCP_METADATA)
            try:
                with open(file, "rb") as fh:
                    metadata = _MetadataUnpickler(fh).load()
            except pickle.UnpicklingError as exc:
                raise tags.unsafe(file, str(exc)) from None
            except Exception as exc:
                raise tags.CheckpointError(f"{file}: cannot be read ({type(exc).__name__}: {exc})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            if hasattr(self, "load_id"):
                metadata.storage_meta.load_id = self.load_id
            return metadata

    reader = SafeReader(path)
    reader.read_metadata()  # refuses a bad file before DCP's collectives start
    return reader


def safe_planner(path: str, base=None, *args):
    """A DCP load planner (``base``, default ``DefaultLoadPlanner``) whose non-tensor entries (pickled
    param-group values) must load with ``torch.load(weights_only=True)`` before DCP's own
    ``weights_only=False`` load of the same bytes."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(base or DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                torch.load(value, map_location="cpu", weights_only=True)
            except Exception as exc:
                found = re.search(r"GLOBAL ([\w.]+)", str(exc))
                raise tags.unsafe(f"{path} (entry {read_item.dest_index.fqn})",
                                  found.group(1) if found else "a function") from None
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafePlanner(*args)


def read_dcp(path: str, keys: set[str] | None = None) -> dict:
    """Every tensor and object of a torch.distributed.checkpoint directory (or those under the
    top-level ``keys``), unsharded, as the nested dict it was saved from (one process, no process
    group); nothing in it runs code (:func:`safe_reader`, :func:`safe_planner`)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    reader = safe_reader(path)
    try:
        _load_state_dict(state, storage_reader=reader, planner=safe_planner(path, _EmptyStateDictLoadPlanner, keys),
                         no_dist=True)
    except (Exception, CheckpointException) as exc:  # DCP's wrapper of every rank's failure is a BaseException
        for inner in causes(exc):
            if isinstance(inner, tags.CheckpointError):
                raise inner from None
        raise tags.CheckpointError(f"{path}: the sharded state cannot be read ({type(exc).__name__}: {exc})") \
            from None
    return state


def causes(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes, and the per-rank failures a DCP ``CheckpointException`` carries."""
    out, todo = [], [exc]
    while todo:
        e = todo.pop()
        if e is None or e in out:
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]  # (exception, traceback)
    return out


def _read_dcp(path: str, meta: dict, weights_only: bool = False) -> FullState:
    if weights_only:
        model = read_dcp(path, {"model"})["model"]
        return FullState(params={k: v.float() for k, v in model.items() if torch.is_tensor(v)}, optim={},
                         steps_by_name={}, groups=[], meta=meta, engine=saved_engine(meta))
    state = read_dcp(path)
    model, optim = state["model"], state["optim"]
    groups = []
    for g in optim["param_groups"]:
        groups.append({"hparams": {k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])})
    names = [n for g in groups for n in g["params"]]
    params, moments, steps = {}, {}, {}
    for n in names:
        params[n] = model[n].float()
        st = optim["state"].get(n, {})
        moments[n] = {k: v.float() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
        steps[n] = float(st["step"]) if "step" in st else None
    extras = {f"state:{k}": v for k, v in model.items() if k not in params and torch.is_tensor(v)}
    return FullState(params=params, optim=moments, steps_by_name=steps, groups=groups, meta=meta,
                     engine=saved_engine(meta), extras=extras)


def check_compatible(fs: FullState, group_names: list[list[str]], optimizer: str | None, engine: str) -> None:
    """Raise :class:`IncompatibleCheckpoint` unless ``fs`` fits an ``engine`` whose optimizer (registry
    name) ``optimizer`` has groups of parameters named ``group_names``."""
    where = f"train.engine={engine}: the {fs.engine} checkpoint {fs.meta.get('tag')!r} cannot be resumed"
    saved_opt = fs.meta.get("optimizer")
    if None not in (saved_opt, optimizer) and saved_opt != optimizer:
        raise IncompatibleCheckpoint(f"{where}: it holds {saved_opt}'s state, this run's optimizer is {optimizer}")
    mine = {n for g in group_names for n in g}
    missing, extra = sorted(mine - set(fs.params)), sorted(set(fs.params) - mine)
    if missing or extra:
        raise IncompatibleCheckpoint(f"{where}: another model (parameters missing from it: {missing[:3]}, "
                                     f"not in this model: {extra[:3]})")
    saved = [set(g["params"]) for g in fs.groups]
    if saved != [set(g) for g in group_names]:
        raise IncompatibleCheckpoint(f"{where}: its {len(saved)} optimizer parameter groups differ from this "
                                     f"run's {len(group_names)} (optim.no_decay_norms_and_biases or the model changed)")
