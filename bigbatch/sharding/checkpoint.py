"""Checkpoints of DeepSpeed engines that resume exactly, on any world size, atomically.

Layout of ``<ckpt_dir>/<tag>/``:

* DeepSpeed's own files (``mp_rank_00_model_states.pt``, ``*zero_pp_rank_*_optim_states.pt``):
  used when the world size and ZeRO stage are unchanged (exact, DeepSpeed's native path);
* ``bigbatch_meta.pt`` (rank 0): world size, stage, batch fields, optimizer name, param-group
  hyperparameters, step counters, LR-scheduler state, engine counters, ``client_state``;
* ``bigbatch_full_state_part<r>.pt`` (rank r keeps every N-th parameter): per parameter name the
  full fp32 weight and every per-element optimizer state (``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, ...), assembled through DeepSpeed's fragment API; part 0 also holds buffers
  and frozen weights. Used to reshard onto another world size or stage, with nothing dropped by
  name (DeepSpeed's universal checkpoint keeps only fp32/exp_avg/exp_avg_sq/step). Each rank
  holds about 1/N of the full state while saving; loading memory-maps the parts;
* ``bigbatch_rng_rank<r>.pt`` (every rank): Python, NumPy and torch RNG states;
* ``bigbatch_manifest.json`` (rank 0, last): every file of the tag with its size in bytes.

``<ckpt_dir>/latest`` names the newest complete tag. It and the manifest are written by rank 0
after a barrier that every rank reaches only when its files are written, each via a temporary
name and ``os.replace``, so a crash mid-save never moves ``latest`` and a tag without a matching
manifest is refused (naming the file), with the previous tag still loadable.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any

import numpy as np
import torch

from bigbatch import atomic
from bigbatch import distributed as bbdist
from bigbatch.sharding import state as st

logger = logging.getLogger(__name__)

FORMAT = "bigbatch-ckpt-1"
META = "bigbatch_meta.pt"
FULL = "bigbatch_full_state_part{}.pt"
MANIFEST = "bigbatch_manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or partial; the message names the file."""


def _rng_state() -> dict:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _optimizer_name(optimizer) -> str:
    """The registry name of the optimizer's scaling rule, else its class path."""
    from bigbatch.optim.registry import canonical_name

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
        kind, name = key.split(":", 1)
        if kind == "buffer" and name in buffers:
            buffers[name].data.copy_(value)
        elif kind == "frozen" and name in params:
            p = params[name]
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if bbdist.rank() == 0:
                        p.data.copy_(value)
            else:
                p.data.copy_(value)


def save_checkpoint(engine, ckpt_dir: str, *, tag: str | None = None, client_state: dict | None = None) -> str:
    """Save ``engine`` under ``ckpt_dir/tag`` (collective: every rank calls it); return that path.

    ``client_state`` (any picklable dict: data position, ...) comes back from
    :func:`load_checkpoint`. RNG states of every rank are saved too.
    """
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    if os.sep in tag or tag in ("", ".", ".."):
        raise ValueError(f"tag={tag!r}: must be a plain directory name")
    path = os.path.join(ckpt_dir, tag)
    rank = bbdist.rank()
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        # re-saving a tag: drop its manifest first so a crash mid-save leaves it refused
        if os.path.exists(os.path.join(path, MANIFEST)):
            os.remove(os.path.join(path, MANIFEST))
    bbdist.barrier()
    client_state = dict(client_state or {})
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"bigbatch_client_state": client_state},
                           save_latest=False)
    world = bbdist.world_size()
    full = st.gather_full_state(engine, keep=lambda i: i % world == rank)
    extras = _module_extras(engine)
    steps = st.group_steps(engine)
    group_of = st.group_index_by_name(engine)
    atomic.torch_save(_rng_state(), os.path.join(path, f"bigbatch_rng_rank{rank}.pt"))
    atomic.torch_save({"params": full, "extras": extras if rank == 0 else {}},
                       os.path.join(path, FULL.format(rank)))
    if rank == 0:
        meta = {
            "format": FORMAT, "tag": tag, "world_size": bbdist.world_size(), "zero_stage": st.stage_of(engine),
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
            "skipped_steps": engine.skipped_steps, "client_state": client_state,
        }
        atomic.torch_save(meta, os.path.join(path, META))
    bbdist.barrier()  # every rank's files are on disk
    if rank == 0:
        files = {}
        for root, _, names in os.walk(path):
            for name in names:
                if name == MANIFEST or atomic.TMP_MARK in name:
                    continue
                full_name = os.path.join(root, name)
                files[os.path.relpath(full_name, path)] = os.path.getsize(full_name)
        atomic.write_text(os.path.join(path, MANIFEST), json.dumps(
            {"format": FORMAT, "tag": tag, "world_size": bbdist.world_size(), "files": files}, indent=1, sort_keys=True),
            fsync=True)
        atomic.write_text(os.path.join(ckpt_dir, LATEST), tag, fsync=True)
    bbdist.barrier()
    return path


def read_latest(ckpt_dir: str) -> str:
    latest = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(latest):
        raise CheckpointError(f"{latest}: no 'latest' file; no complete checkpoint in {ckpt_dir!r}")
    with open(latest) as f:
        tag = f.read().strip()
    if not tag:
        raise CheckpointError(f"{latest}: empty")
    return tag


def verify_checkpoint(ckpt_dir: str, tag: str) -> dict:
    """Check that every file listed in the tag's manifest exists with its size; return the manifest."""
    path = os.path.join(ckpt_dir, tag)
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{manifest_path}: missing; the save of tag {tag!r} did not finish "
                              "(partial checkpoint)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for rel, size in sorted(manifest["files"].items()):
        fp = os.path.join(path, rel)
        if not os.path.isfile(fp):
            raise CheckpointError(f"{fp}: missing (listed in {MANIFEST}); partial checkpoint")
        actual = os.path.getsize(fp)
        if actual != size:
            raise CheckpointError(f"{fp}: {actual} bytes, manifest says {size}; truncated or modified")
    return manifest


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Tags under ``ckpt_dir`` that pass :func:`verify_checkpoint`, newest manifest first."""
    good = []
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        try:
            verify_checkpoint(ckpt_dir, name)
        except CheckpointError:
            continue
        good.append((os.path.getmtime(os.path.join(ckpt_dir, name, MANIFEST)), name))
    return [name for _, name in sorted(good, reverse=True)]


def _torch_load(path: str, mmap: bool = False):
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # a corrupt pickle/zip: name the file
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def load_checkpoint(engine, ckpt_dir: str, *, tag: str | None = None, plan=None, fallback: bool = False) -> dict:
    """Restore ``engine`` from ``ckpt_dir`` (collective); return the saved ``client_state``.

    * same world size and ZeRO stage: DeepSpeed's own loader (exact), plus RNG states;
    * otherwise: weights and every optimizer state are scattered from the full state into the
      new partitioning (nothing dropped), group hyperparameters, step counters, scheduler and
      engine counters restored; RNG states are per rank and restored only if the rank existed.
    * if ``plan.global_batch`` differs from the saved global batch: :func:`rescale_engine`
      (hyperparameters by the scaling rules, step counters by samples); the new values are logged.

    ``tag=None`` reads ``latest``. A missing, truncated or partial checkpoint raises
    :class:`CheckpointError` naming the file; with ``fallback=True`` the newest complete tag is
    loaded instead (logged).
    """
    if tag is None:
        tag = read_latest(ckpt_dir)
    try:
        verify_checkpoint(ckpt_dir, tag)
    except CheckpointError as exc:
        if not fallback:
            raise
        good = [t for t in list_checkpoints(ckpt_dir) if t != tag]
        if not good:
            raise CheckpointError(f"{exc}; and no other complete checkpoint in {ckpt_dir!r}") from None
        logger.warning("bigbatch: %s; falling back to the newest complete checkpoint %r", exc, good[0])
        tag = good[0]
    path = os.path.join(ckpt_dir, tag)
    meta = _torch_load(os.path.join(path, META))
    rank, world = bbdist.rank(), bbdist.world_size()
    same = meta["world_size"] == world and meta["zero_stage"] == st.stage_of(engine)
    if same:
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load it")
    else:
        logger.info("bigbatch: resharding %s from world size %d (ZeRO-%d) to %d (ZeRO-%d)", path,
                    meta["world_size"], meta["zero_stage"], world, st.stage_of(engine))
        full, extras = load_full_state(path, meta["full_state_parts"])
        _restore_groups(engine, meta)
        st.scatter_full_state(engine, full, meta["steps_by_name"])
        _load_module_extras(engine, extras)
        if meta["scheduler"] is not None and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(meta["scheduler"])
        engine.global_steps = meta["global_steps"]
        engine.global_samples = meta["global_samples"]
        engine.skipped_steps = meta["skipped_steps"]
    rng_file = os.path.join(path, f"bigbatch_rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(_torch_load(rng_file))
    if plan is not None and plan.global_batch != meta["global_batch"]:
        rescale_engine(engine, plan.global_batch / meta["global_batch"], optimizer=meta["optimizer"],
                       beta_form=plan.beta_form)
    bbdist.barrier()
    return meta["client_state"]


def load_full_state(path: str, parts: int) -> tuple[dict, dict]:
    """Merge the full-state parts of a checkpoint directory (memory-mapped)."""
    params, extras = {}, {}
    for r in range(parts):
        blob = _torch_load(os.path.join(path, FULL.format(r)), mmap=True)
        params.update(blob["params"])
        extras.update(blob["extras"])
    return params, extras


def _restore_groups(engine, meta: dict) -> None:
    """Hyperparameters of each client group, matched by the names of its parameters."""
    by_name = meta["group_by_name"]
    saved = meta["group_hparams"]
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    for g, params in st.lp_groups(engine):
        names = {name_of[id(p)] for p in params if id(p) in name_of}
        src = {by_name[n] for n in names if n in by_name}
        if len(src) > 1:
            raise CheckpointError(f"parameter group {g}: its parameters came from saved groups {sorted(src)}")
        if src:
            engine.basic_optimizer.param_groups[g].update(saved[src.pop()])


def rescale_engine(engine, kappa: float, *, optimizer: str, beta_form: str = "paper") -> dict:
    """Move a restored run to a global batch ``kappa`` times the saved one.

    Hyperparameters of every group are rescaled by ``bigbatch.optim.scale_hparams`` with the
    relative ``kappa`` (the rules compose: scaling by k1 then k2 equals scaling by k1*k2).
    AdaBound's ``base_lr`` and the scheduler's base lrs move with lr, so the schedule factor
    lr/base_lr and the effective final_lr = final_lr * lr / base_lr follow the rules. Step
    counters become ``step / kappa``: the same number of samples seen, so bias corrections
    (beta^step with the rescaled beta) and AdaBound's bounds (gamma*step with gamma*kappa)
    continue smoothly; the scheduler's ``last_epoch`` and the engine's ``global_steps`` are
    converted the same way (rounded). Returns and logs the new values.
    """
    from bigbatch.optim.registry import constructor_params, get_optimizer_class
    from bigbatch.scaling.rules import scale_hparams

    names = constructor_params(get_optimizer_class(optimizer))
    report: dict[str, Any] = {"kappa": kappa, "groups": [], "lr_ratios": []}
    ratios = []
    for group in engine.basic_optimizer.param_groups:
        hp = {k: group[k] for k in names if k in group and k not in ("foreach", "fused")}
        new = scale_hparams(optimizer, hp, kappa, beta_form=beta_form)
        ratio = new["lr"] / hp["lr"] if hp.get("lr") else 1.0
        ratios.append(ratio)
        report["lr_ratios"].append(ratio)
        for key in ("base_lr", "initial_lr"):
            if key in group:
                group[key] = group[key] * ratio
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in new.items()})
        report["groups"].append({k: new[k] for k in new})
    sched = engine.lr_scheduler
    if sched is not None and hasattr(sched, "base_lrs"):
        sched.base_lrs = [b * r for b, r in zip(sched.base_lrs, ratios)]
        if hasattr(sched, "_last_lr"):
            sched._last_lr = [g["lr"] for g in engine.basic_optimizer.param_groups]
        if hasattr(sched, "last_epoch"):
            old = sched.last_epoch
            sched.last_epoch = int(round(old / kappa))
            report["scheduler_last_epoch"] = (old, sched.last_epoch)
    steps = st.group_steps(engine)
    new_steps = [None if s is None else s / kappa for s in steps]
    st.set_group_steps(engine, new_steps)
    report["steps"] = (steps, new_steps)
    old_gs = engine.global_steps
    engine.global_steps = int(round(old_gs / kappa))
    report["global_steps"] = (old_gs, engine.global_steps)
    if bbdist.rank() == 0:
        logger.warning("bigbatch: global batch changed by kappa=%.6g; rescaled hyperparameters %s; "
                       "step counters %s -> %s; global_steps %d -> %d", kappa, report["groups"], steps,
                       new_steps, old_gs, engine.global_steps)
    return report
