"""Checkpoints of DeepSpeed engines that resume exactly, on any world size, stage or engine, atomically.

Layout of ``<ckpt_dir>/<tag>/`` (each tensor stored once: DeepSpeed's own files, which would hold
the optimizer state a second time, are not written):

* ``bigbatch_meta.pt`` (rank 0): engine, world size, stage, batch fields, optimizer name, param-group
  hyperparameters, step counters, LR-scheduler state, engine counters, fp16's loss scale, ``client_state``;
* ``bigbatch_full_state_part<r>.pt`` (rank r keeps every N-th parameter): per parameter name the
  full fp32 weight and every per-element optimizer state (``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, ...), assembled through DeepSpeed's fragment API; part 0 also holds buffers
  and frozen weights. Every load scatters it into the engine's partitioning, the same one (bitwise
  the uninterrupted run: fp32 values copied, bf16/fp16 weights cast from their fp32 master as
  DeepSpeed does after a step) or another world size, stage or engine, with nothing dropped by
  name (DeepSpeed's universal checkpoint keeps only fp32/exp_avg/exp_avg_sq/step). Each rank
  holds about 1/N of the full state while saving; loading memory-maps the parts
  (:func:`bigbatch.sharding.full_state.read_full_state` reads it in one process);
* ``bigbatch_rng_rank<r>.pt`` (every rank): Python, NumPy and torch RNG states;
* ``bigbatch_manifest.json`` (rank 0, last): every file of the tag with its size and content hash
  (:mod:`bigbatch.sharding.tags`).

Saving is collective and all-or-nothing: every step that writes reports to every rank, a failure on
any rank (a full disk, an unwritable directory) removes the new tag's files everywhere and raises
:class:`CheckpointSaveError` on every rank naming the rank, the file and the OS error; ``latest`` and
the previous tags are untouched. Our own files are written to a temporary name and renamed.
Loading verifies sizes and hashes first (the ranks share the hashing) and can fall back to the
previous good tag; ``latest`` is only a hint.
"""

from __future__ import annotations

import logging
import os

import torch

from bigbatch import distributed as bbdist
from bigbatch.optim.registry import canonical_name
from bigbatch.rng import rng_state
from bigbatch.sharding import deepspeed_state as st
from bigbatch.sharding import tags
from bigbatch.sharding.full_state import FULL, FullState, check_compatible, read_full_state, saved_engine
from bigbatch.sharding.tags import CheckpointError

logger = logging.getLogger(__name__)


def _optimizer_name(optimizer) -> str:
    """The registry name of the optimizer's scaling rule, else its class path."""

    cls = type(optimizer)
    return canonical_name(cls) or f"{cls.__module__}.{cls.__qualname__}"


def _group_hparams(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def _module_extras(engine) -> dict[str, torch.Tensor]:
    """Buffers and frozen weights (full values; ZeRO-3 frozen weights gathered)."""
    import deepspeed

    out = {f"buffer:{n}": b.detach().cpu().clone() for n, b in engine.module.named_buffers()}
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            continue
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                out[f"frozen:{n}"] = p.detach().cpu().clone()
        else:
            out[f"frozen:{n}"] = p.detach().cpu().clone()
    return out


def _load_module_extras(engine, extras: dict[str, torch.Tensor]) -> None:
    import deepspeed

    buffers = dict(engine.module.named_buffers())
    params = dict(engine.module.named_parameters())
    for key, value in extras.items():
        kind, name = key.split(":", 1)  # "state": another engine's state-dict key, buffer or frozen weight
        if kind in ("buffer", "state") and name in buffers:
            buffers[name].data.copy_(value)
        elif name in params and (kind == "frozen" or (kind == "state" and not params[name].requires_grad)):
            p = params[name]
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if bbdist.rank() == 0:
                        p.data.copy_(value)
            else:
                p.data.copy_(value)


def save_checkpoint(engine, ckpt_dir: str, *, tag: str | None = None, client_state: dict | None = None,
                    keep: int | None = None) -> str:
    """Save ``engine`` under ``ckpt_dir/tag`` (collective: every rank calls it); return that path.

    ``client_state`` (any picklable dict: data position, ...) comes back from
    :func:`load_checkpoint`. RNG states of every rank are saved too. ``keep``: once the tag is
    complete, delete all but the ``keep`` newest complete tags (and incomplete leftovers of failed
    saves). Raises :class:`CheckpointSaveError` on every rank when the save failed on any (see the
    module docstring).
    """
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    save = tags.TagSave(ckpt_dir, tag)
    rank, world = bbdist.rank(), bbdist.world_size()
    client_state = dict(client_state or {})
    full = st.gather_full_state(engine, keep=lambda i: i % world == rank)
    extras = _module_extras(engine)
    steps = st.group_steps(engine)
    group_of = st.group_index_by_name(engine)
    files = [(tags.RNG.format(rank), rng_state()),
             (FULL.format(rank), {"params": full, "extras": extras if rank == 0 else {}})]
    if rank == 0:
        files.append((tags.META, {
            "format": tags.FORMAT, "tag": tag, "engine": "deepspeed", "world_size": world,
            "zero_stage": st.stage_of(engine),
            "full_state_parts": world, "global_batch": engine.train_batch_size(),
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "grad_accum": engine.gradient_accumulation_steps(),
            "optimizer": _optimizer_name(engine.basic_optimizer),
            "group_hparams": [_group_hparams(g) for g in engine.basic_optimizer.param_groups],
            "group_steps": steps,
            "steps_by_name": {n: steps[g] for n, g in group_of.items()},
            "group_by_name": group_of,
            "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps, "loss_scaler": _loss_scaler_state(engine),
            "client_state": client_state,
        }))
    save.write(files)  # every rank's files are on disk, or the save failed
    return save.finish(keep=keep, samples=engine.global_samples, steps=engine.global_steps)


def verify_checkpoint(ckpt_dir: str, tag: str) -> dict:
    """Check that every file listed in the tag's manifest exists with its size and content hash;
    return the manifest (:func:`bigbatch.sharding.tags.verify_tag`)."""
    return tags.verify_tag(ckpt_dir, tag)


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete tags whose files are all present with their sizes, newest first (contents are hashed
    when a tag is loaded)."""
    return tags.good_tags(ckpt_dir)


def load_checkpoint(engine, ckpt_dir: str, *, tag: str | None = None, plan=None, fallback: bool = False) -> dict:
    """Restore ``engine`` from ``ckpt_dir`` (collective); return the saved ``client_state``.

    Weights and every optimizer state are scattered from the tag's full state into this engine's
    partitioning (any world size and stage; an FSDP2 tag too), group hyperparameters, step counters,
    scheduler and engine counters restored; RNG states are per rank and restored only if the rank
    existed. At the saving world size and stage the run continues bitwise.
    * if ``plan.global_batch`` differs from the saved global batch: :func:`~bigbatch.sharding.deepspeed_state.rescale_engine`
      (hyperparameters by the scaling rules, step counters by samples); the new values are logged.

    The tag's files are verified first (sizes, content hashes). ``tag=None`` takes the tag
    ``latest`` names. A missing, truncated, corrupt or partial checkpoint raises
    :class:`CheckpointError` naming the file; with ``fallback=True`` the next good tag is tried
    instead (newest first; an unreadable ``latest`` is passed over too), the tag used and the
    refused ones are logged, and :class:`NoUsableCheckpoint` lists every refused tag and why when
    none is good.
    """
    return tags.load_first_good(ckpt_dir, tag, fallback, lambda t: _load_tag(engine, ckpt_dir, t, plan))


def _load_tag(engine, ckpt_dir: str, tag: str, plan) -> dict:
    path = os.path.join(ckpt_dir, tag)
    meta = tags.read_meta(ckpt_dir, tag)
    rank, world = bbdist.rank(), bbdist.world_size()
    if saved_engine(meta) != "deepspeed":
        logger.info("bigbatch: loading %s, saved by %s on %d processes, into DeepSpeed ZeRO-%d on %d", path,
                    saved_engine(meta), meta["world_size"], st.stage_of(engine), world)
        fs = read_full_state(ckpt_dir, tag, meta=meta)
        check_compatible(fs, _group_names(engine), _optimizer_name(engine.basic_optimizer), "deepspeed")
    else:
        if meta["world_size"] != world or meta["zero_stage"] != st.stage_of(engine):
            logger.info("bigbatch: resharding %s from world size %d (ZeRO-%d) to %d (ZeRO-%d)", path,
                        meta["world_size"], meta["zero_stage"], world, st.stage_of(engine))
        fs = read_full_state(ckpt_dir, tag, meta=meta)
    _load_full(engine, fs)
    tags.restore_rng(path, rank)
    if plan is not None and plan.global_batch != meta["global_batch"]:
        st.rescale_engine(engine, plan.global_batch / meta["global_batch"], plan.rule)
    bbdist.barrier()
    return meta["client_state"]


def _load_full(engine, fs: FullState) -> None:
    """Weights, every optimizer state, step counters, group hyperparameters, buffers, scheduler and
    engine counters from a tag's by-name full state (any world size, stage or engine)."""
    meta, client = fs.meta, fs.meta.get("client_state") or {}
    _restore_groups(engine, fs.group_by_name, [g["hparams"] for g in fs.groups])
    full = {n: {"fp32": w, "state": fs.optim.get(n, {})} for n, w in fs.params.items()}
    st.scatter_full_state(engine, full, fs.steps_by_name)
    _load_module_extras(engine, fs.extras)
    if meta.get("scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["scheduler"])
    # an FSDP2 tag has no DeepSpeed counters: the loop's position stands for them
    engine.global_steps = meta.get("global_steps", client.get("step", 0))
    engine.global_samples = meta.get("global_samples", client.get("samples", 0))
    engine.skipped_steps = meta.get("skipped_steps", client.get("skipped_steps", 0))
    _set_loss_scaler_state(engine, meta.get("loss_scaler"))


_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _loss_scaler_state(engine) -> dict | None:
    """fp16's dynamic loss scale (the only state of DeepSpeed's optimizer wrapper besides the tensors)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not engine.fp16_enabled():
        return None
    return {k: getattr(scaler, k) for k in _SCALER_FIELDS if hasattr(scaler, k)}


def _set_loss_scaler_state(engine, state: dict | None) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if state and scaler is not None and engine.fp16_enabled():
        for k, v in state.items():
            setattr(scaler, k, v)


def _group_names(engine) -> list[list[str]]:
    """Names of the trainable parameters of each client-optimizer group."""
    by_name = st.group_index_by_name(engine)
    out: list[list[str]] = [[] for _ in engine.basic_optimizer.param_groups]
    for n, g in by_name.items():
        out[g].append(n)
    return out


def _restore_groups(engine, by_name: dict[str, int], saved: list[dict]) -> None:
    """Hyperparameters of each client group, matched by the names of its parameters."""
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    for g, params in st.lp_groups(engine):
        names = {name_of[id(p)] for p in params if id(p) in name_of}
        src = {by_name[n] for n in names if n in by_name}
        if len(src) > 1:
            raise CheckpointError(f"parameter group {g}: its parameters came from saved groups {sorted(src)}")
        if src:
            engine.basic_optimizer.param_groups[g].update(saved[src.pop()])
