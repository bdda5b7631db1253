"""``bigbatch plan``: before a run is queued, in one CPU process and a few seconds for any model size, what it
will need and do: parameters, memory per GPU under ZeRO 0-3 and FSDP2 and the largest micro batch that fits
(:mod:`bigbatch.scaling.memory`), the batch plan at this world size with every scaled hyperparameter and its
rule (:func:`bigbatch.training.builders.make_plan`), the batch an automatic schedule is expected to follow, and
tokens/s, wall time and node-hours of a fixed small, a fixed large and a scale-out allocation
(:mod:`bigbatch.scaling.cost`).

    bigbatch plan --config configs/1.3b.yaml --nodes 4 --gpus-per-node 8 [--gpu h100] [--json] [--section.key V]

The model is built on the meta device (no memory). A plan whose engine does not fit the GPU at its micro batch
is refused (exit 2, one line naming what to change), as is bad input. :func:`announce` prints the one-line
summary at the start of a run and :func:`check_peak` compares the run's measured peak with it at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field, replace

from bigbatch.cli_parser import ArgumentParser, command_main
from bigbatch.errors import ConfigError
from bigbatch.scaling import cost
from bigbatch.scaling.memory import (CUDA_RESERVE, ENGINES, GB, GPUS, GPU, MemoryEstimate, ModelShape, Strategy,
                                     estimate, gpu_named, largest_micro_batch, model_shape, optimizer_states)
from bigbatch.training.config import RunConfig

DEFAULT_GPU = "h100"
#: a measured peak this much above the plan's is worth a warning
PEAK_TOLERANCE = 1.25
PEAK_SLACK = 0.5 * 2**30  # bytes above the plan that never warn (a process's overhead)
#: hub tokenizers whose size is known without the files (the plan never downloads)
KNOWN_VOCABS = {"gpt2": 50257, "openai-community/gpt2": 50257}
ENGINE_LABELS = {"zero0": "ZeRO stage 0", "zero1": "ZeRO stage 1", "zero2": "ZeRO stage 2", "zero3": "ZeRO stage 3",
                 "fsdp2": "FSDP2"}


def _size(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def vocab_size(cfg: RunConfig) -> int:
    """The embedding rows the run will have, without training or downloading a tokenizer: ``model.vocab_size``,
    else the tokenizer's size (a BPE's ``tokenizer.vocab_size``; a pretrained one read from its local files, or
    a known hub name's), padded to ``model.pad_vocab_to``."""
    from bigbatch.training.model import padded_vocab

    m = cfg.model
    if m.vocab_size is not None:
        return m.vocab_size
    t = cfg.tokenizer
    if t.kind == "bpe":
        return padded_vocab(m, t.vocab_size)
    n = KNOWN_VOCABS.get(t.path)
    if n is None:
        try:
            from transformers import AutoTokenizer

            n = len(AutoTokenizer.from_pretrained(os.path.expanduser(t.path), local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure to read it means: not here
            raise ConfigError(f"tokenizer.path: {t.path!r} is not readable here (the plan downloads nothing); give "
                              "--model.vocab_size N (the tokenizer's size, padded)") from None
    return padded_vocab(m, n)


def _deepspeed(cfg: RunConfig, batch) -> dict:
    from bigbatch.sharding.deepspeed_engine import deepspeed_config

    ds = deepspeed_config(cfg, batch)
    zero = ds.get("zero_optimization", {})
    h = cfg.model.hidden_size  # DeepSpeed's "auto" bucket sizes, as bigbatch.sharding.deepspeed_config fills them
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value
    return ds


def strategies(cfg: RunConfig, batch, world: int, on_gpu: bool) -> dict[str, Strategy]:
    """Every engine for this config: ZeRO 0-3 with the config's DeepSpeed JSON (buckets, precision) at each
    stage, and FSDP2 with its section."""
    cls = batch.optimizer_class
    k = optimizer_states(cls, batch.hparams)
    bigbatch_fused = cls.__module__.startswith("bigbatch.")
    # torch's optimizers: foreach on CUDA (one temporary as large as the states it updates), one tensor at a time
    # on CPU (two); bigbatch's update in place
    temps, foreach = (0.0, True) if bigbatch_fused else (1.0, True) if on_gpu else (2.0, False)
    device = "cuda" if on_gpu else "cpu"
    heap = not on_gpu and not os.environ.get("MALLOC_MMAP_THRESHOLD_")
    ds = _deepspeed(cfg, batch)
    out = {}
    for stage in range(4):
        d = {**ds, "zero_optimization": {**ds.get("zero_optimization", {}), "stage": stage}}
        out[f"zero{stage}"] = Strategy.from_deepspeed(d, world, states=k, optimizer_temporaries=temps,
                                                      optimizer_foreach=foreach, device=device, heap_retains=heap)
    f = cfg.fsdp2
    out["fsdp2"] = Strategy("fsdp2", world, f.precision, k, activation_checkpointing=f.activation_checkpointing,
                            optimizer_temporaries=temps, optimizer_foreach=foreach, device=device,
                            heap_retains=heap)
    return out


@dataclass
class RunPlan:
    """Everything ``bigbatch plan`` says, as numbers (bytes, tokens, seconds)."""

    cfg: RunConfig
    shape: ModelShape
    nodes: int
    gpus_per_node: int
    gpu: GPU | None
    batch: object  # BatchPlan
    engine: str  # the config's: zero0..zero3 | fsdp2
    seq_len: int
    strategies: dict[str, Strategy]
    trajectory: list[tuple[float, float]] = field(default_factory=list)  # (tokens, global batch in sequences)
    costs: dict = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def budget(self) -> float | None:
        """Bytes a GPU gives the run's tensors (its memory less :data:`CUDA_RESERVE`)."""
        return None if self.gpu is None else self.gpu.memory - CUDA_RESERVE

    def memory_for(self, engine: str, *, checkpointing: bool | None = None, micro: int | None = None) -> MemoryEstimate:
        s = self.strategies[engine]
        if checkpointing is not None:
            s = replace(s, activation_checkpointing=checkpointing)
        return estimate(self.shape, s, micro or self.batch.micro_batch, self.seq_len)

    def largest_micro(self, engine: str, checkpointing: bool) -> int | None:
        if self.budget is None:
            return None
        s = replace(self.strategies[engine], activation_checkpointing=checkpointing)
        return largest_micro_batch(self.shape, s, self.seq_len, self.budget)

    def memory_table(self) -> dict:
        out = {}
        for e in ENGINES:
            plain, ckpt = self.memory_for(e, checkpointing=False), self.memory_for(e, checkpointing=True)
            out[e] = {**plain.rows(), "activations_checkpointed": ckpt.activations, "peak_checkpointed": ckpt.peak,
                      "largest_micro_batch": self.largest_micro(e, False),
                      "largest_micro_batch_checkpointed": self.largest_micro(e, True)}
        return out

    def hparam_rows(self) -> list[tuple[str, object, object, str]]:
        b = self.batch
        ref = b.reference_hparams or {}
        rows = []
        for key, value in b.hparams.items():
            rule = b.rule.describe(key, ref)
            rows.append((key, ref.get(key, "(default)"), value, rule))
        return rows

    # ------------------------------------------------------------------ output

    def to_dict(self) -> dict:
        b = self.batch
        return {
            "model": {"arch": self.shape.arch, "parameters": self.shape.params, "layers": self.shape.layers,
                      "hidden": self.shape.hidden, "vocab": self.shape.vocab, "seq_len": self.seq_len},
            "cluster": {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "world_size": self.world,
                        "gpu": None if self.gpu is None else self.gpu.name,
                        "gpu_memory": None if self.gpu is None else self.gpu.memory, "usable_memory": self.budget},
            "engine": self.engine, "precision": self.strategies[self.engine].precision,
            "optimizer_states_per_parameter": self.strategies[self.engine].states,
            "memory": self.memory_table(),
            "batch": {"micro_batch": b.micro_batch, "grad_accum": b.grad_accum, "global_batch": b.global_batch,
                      "tokens_per_step": b.global_batch * self.seq_len,
                      "reference_global_batch": b.reference_global_batch,
                      "kappa": b.kappa, "optimizer": b.optimizer, **b.rule.forms()},
            "hparams": [{"key": k, "reference": _plain(r), "scaled": _plain(v), "rule": rule}
                        for k, r, v, rule in self.hparam_rows()],
            "schedule": {"kind": _schedule_kind(self.cfg), "trajectory": [{"tokens": t, "global_batch": g}
                                                                          for t, g in self.trajectory]},
            "cost": self.costs,
            "assumptions": self.assumptions,
        }

    def summary(self) -> str:
        """One line: model, engine, memory per GPU, batch, hyperparameters, time."""
        b, mem = self.batch, self.memory_for(self.engine)
        fits = ""
        if self.gpu is not None:
            fits = f" of {self.budget / GB:.0f} GB usable on {self.gpu.name} (largest micro batch " \
                   f"{self.largest_micro(self.engine, self.strategies[self.engine].activation_checkpointing)})"
        hp = ", ".join(f"{k} {_fmt(v)}" for k, _, v, _ in self.hparam_rows())
        c = self.costs.get("strategies", {})
        first = next(iter(c.values()), None)
        gpu = (self.gpu or GPUS[DEFAULT_GPU]).name.split()[0]
        when = f" | {first['wall_h']:.3g} h, {first['node_h']:.4g} node-h ({first['nodes']} nodes of {gpu} at " \
               f"{cost.MFU:.0%} MFU)" if first else ""
        unit = "GPU" if self.strategies[self.engine].device == "cuda" else "process"
        units = unit if self.world == 1 else {"GPU": "GPUs", "process": "processes"}[unit]
        return (f"plan: {_size(self.shape.params)} params | {ENGINE_LABELS[self.engine]} "
                f"{self.strategies[self.engine].precision} on {self.world} {units}: {mem.peak / GB:.2f} GB per {unit}"
                f"{fits} | global batch {b.global_batch} = {b.micro_batch} x {b.grad_accum} accum x {self.world} "
                f"(kappa {b.kappa:g}) | {b.optimizer} {hp}{when}")

    def render(self) -> str:
        b, s = self.batch, self.shape
        lines = [f"model: {s.arch}, {s.params:,} parameters ({_size(s.params)}), {s.layers} layers x hidden "
                 f"{s.hidden}, "
                 f"vocab {s.vocab}, seq_len {self.seq_len}",
                 f"cluster: {self.nodes} node(s) x {self.gpus_per_node} GPU(s) = {self.world}"
                 + ("" if self.gpu is None else f" x {self.gpu.name} ({self.budget / GB:.0f} GB usable of "
                                                f"{self.gpu.memory / GB:.0f}; {CUDA_RESERVE / GB:.0f} GB kept for the "
                                                "CUDA context, NCCL and the allocator)"),
                 f"engine: {ENGINE_LABELS[self.engine]}, {self.strategies[self.engine].precision}, "
                 f"{self.strategies[self.engine].states} float32 optimizer state(s) per parameter ({b.optimizer})",
                 "", f"memory per GPU (GB) at micro batch {b.micro_batch} x {self.seq_len} tokens:",
                 "| engine | weights | grads | optimizer | activations | act. ckpt | buffers | peak | peak ckpt "
                 "| largest micro (ckpt) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e, r in self.memory_table().items():
            mark = " <- config" if e == self.engine else ""
            most = "-" if r["largest_micro_batch"] is None else \
                f"{r['largest_micro_batch']} ({r['largest_micro_batch_checkpointed']})"
            lines.append(f"| {ENGINE_LABELS[e]}{mark} | {r['weights'] / GB:.2f} | {r['gradients'] / GB:.2f} | "
                         f"{r['optimizer'] / GB:.2f} | {r['activations'] / GB:.2f} | "
                         f"{r['activations_checkpointed'] / GB:.2f} | {r['buffers'] / GB:.2f} | {r['peak'] / GB:.2f} | "
                         f"{r['peak_checkpointed'] / GB:.2f} | {most} |")
        lines += ["", f"batch: global {b.global_batch} sequences ({b.global_batch * self.seq_len:,} tokens) = micro "
                      f"{b.micro_batch} x accumulation {b.grad_accum} x {self.world} GPUs; reference "
                      f"{b.reference_global_batch}, kappa {b.kappa:g}",
                  "| hyperparameter | at reference | at this batch | rule |", "|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(r)} | {_fmt(v)} | {rule} |" for k, r, v, rule in self.hparam_rows()]
        if len(self.trajectory) > 1 or _schedule_kind(self.cfg) != "none":
            steps = ", ".join(f"{g:g} from {t / 1e9:.3g}B" for t, g in self.trajectory)
            lines += ["", f"batch schedule ({_schedule_kind(self.cfg)}): expected global batch (sequences) over "
                          f"tokens: {steps}"]
        c = self.costs
        if c:
            lines += ["", f"cost of {c['tokens'] / 1e9:.4g}B tokens:",
                      "| strategy | nodes | tokens/s | wall h | node-h | tokens (x schedule run) | moves |",
                      "|---|---|---|---|---|---|---|"]
            for name, r in c["strategies"].items():
                lines.append(f"| {name} | {r['nodes']} | {r['tokens_per_s']:,.0f} | {r['wall_h']:.4g} | "
                             f"{r['node_h']:.4g} | {r['tokens_ratio']:.3f} | {r['moves']} |")
        lines += ["", "assumptions: " + " ".join(self.assumptions)]
        return "\n".join(lines)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _schedule_kind(cfg: RunConfig) -> str:
    s = cfg.batch.schedule
    return "none" if s is None else "auto" if s == "auto" else "fixed"


def _costs(p: RunPlan, params: float) -> tuple[list, dict, list[str]]:
    """Trajectory of the global batch, the three strategies' costs and the assumptions said."""
    cfg, seq = p.cfg, p.seq_len
    flops = p.gpu.bf16_flops if p.gpu is not None else GPUS[DEFAULT_GPU].bf16_flops
    precision = p.strategies[p.engine].precision
    gpn, nodes = p.gpus_per_node, p.nodes
    b_noise = cost.critical_batch_curve(params)
    sched = cfg.batch.batch_schedule()
    if sched is None:
        batch_tokens = p.batch.global_batch * seq

        def batch_at(_t, _bn):
            return batch_tokens
        largest = batch_tokens
    elif cfg.batch.schedule == "auto":
        def batch_at(_t, bn):
            return cost.schedule_batch(bn, sched.start * seq, sched.maximum * seq, sched.factor, sched.margin)
        largest = sched.maximum * seq
    else:
        def batch_at(t, _bn):
            return sched.batch_at(t) * seq
        largest = max(sched.batches()) * seq
    max_accum = cfg.scale_out.max_grad_accum
    per_node = gpn * p.batch.micro_batch * seq
    large = cfg.scale_out.max_nodes or max(nodes, math.ceil(largest / (per_node * max_accum)))
    c = cost.paper_cluster("plan", params=params, tokens=cfg.train.tokens, micro_batch=p.batch.micro_batch,
                           seq_len=seq, gpus_per_node=gpn, small=nodes, max_nodes=max(large, nodes),
                           gpu_flops=flops, grad_bytes_per_param=2.0 if precision != "fp32" else 4.0,
                           max_grad_accum=max_accum)
    res = cost.costs(c, b_noise, batch_at=batch_at)
    traj = [(t, b / seq) for t, b in cost.batch_trajectory(batch_at, b_noise, cfg.train.tokens)]
    base = res["c"]["tokens"]
    rows = {}
    # without a schedule the batch never grows: no move to make, only the same batch on more nodes
    keys = ("a",) if c.max_nodes == c.small else ("a", "b") if sched is None else ("a", "b", "c")
    for k in keys:
        r = res[k]
        n = {"a": str(c.small), "b": str(c.max_nodes), "c": f"{c.small}->{c.max_nodes}"}[k]
        rows[cost.STRATEGIES[k]] = {"nodes": n, "tokens_per_s": r["tokens"] / r["wall_s"],
                                    "wall_h": r["wall_s"] / 3600, "node_h": r["node_s"] / 3600,
                                    "tokens_ratio": r["tokens"] / base, "moves": r["moves"] if k == "c" else "-"}
    gpu = p.gpu.name if p.gpu is not None else GPUS[DEFAULT_GPU].name
    notes = [f"Cost on paper: {gpu} at {cost.assumptions()}."]
    if cfg.batch.schedule == "auto":
        notes.append("The automatic schedule is assumed to see that critical batch as B_noise (it grows "
                     f"x{sched.factor} when B_noise >= {sched.margin:g} x the next batch; the run measures the real one).")
    notes.append("Memory: bigbatch.scaling.memory (activations after Korthikanti et al. 2022 for SDPA blocks; "
                 "checked against measured peaks on CPU by benchmarks/plan_memory.py).")
    return traj, {"tokens": cfg.train.tokens, "strategies": rows}, notes


def plan_run(cfg: RunConfig, *, nodes: int, gpus_per_node: int, gpu: str | None = DEFAULT_GPU,
             tokenizer_size: int | None = None, seq_len: int | None = None, world_size: int | None = None,
             device: str | None = None, with_cost: bool = True, global_batch: int | None = None) -> RunPlan:
    """The :class:`RunPlan` of ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs of kind ``gpu`` (a key of
    :data:`~bigbatch.scaling.memory.GPUS`; None: no memory limit to check). ``device``: ``cuda`` (the default
    with a ``gpu``) or ``cpu`` (the default without: process memory on CPU). ``tokenizer_size``: the run's
    tokenizer, when it is at hand (else :func:`vocab_size`). ConfigError for an infeasible batch or a bad key.
    ``world_size``: the processes that share the model states, when not every GPU does; ``global_batch``: the
    batch the run starts at when it is not the config's (a scale-out resume)."""
    from bigbatch.training.builders import check_batch, make_plan
    from bigbatch.training.model import build_model, padded_vocab

    world = world_size or nodes * gpus_per_node
    check_batch(cfg, world)
    batch = make_plan(cfg, world, global_batch)
    seq = seq_len or cfg.data.seq_len
    vocab = padded_vocab(cfg.model, tokenizer_size) if tokenizer_size else vocab_size(cfg)
    model = build_model(cfg.model, vocab, seq, device="meta")
    shape = model_shape(model, cfg.model.arch)
    strat = strategies(cfg, batch, world, on_gpu=(device or ("cuda" if gpu else "cpu")) == "cuda")
    engine = "fsdp2" if cfg.train.engine == "fsdp2" else f"zero{_deepspeed(cfg, batch)['zero_optimization']['stage']}"
    p = RunPlan(cfg, shape, nodes, gpus_per_node, GPUS[gpu] if gpu else None, batch, engine, seq, strat)
    if with_cost:
        p.trajectory, p.costs, p.assumptions = _costs(p, shape.params)
    return p


def _engine_option(engine: str) -> str:
    return "--train.engine fsdp2" if engine == "fsdp2" else f"--deepspeed.zero_stage {engine[-1]}"


def fit_problem(p: RunPlan) -> str | None:
    """Why the config's engine does not fit the GPU at its micro batch, naming what to change; else None."""
    if p.budget is None:
        return None
    ckpt = p.strategies[p.engine].activation_checkpointing
    mem = p.memory_for(p.engine)
    if mem.peak <= p.budget:
        return None
    if mem.build > mem.training:
        what = (f"{ENGINE_LABELS[p.engine]} needs {mem.peak / GB:.1f} GB per GPU to build the {_size(p.shape.params)} "
                "model (train.py moves the whole float32 model to each GPU before FSDP2 shards it)")
    else:
        what = (f"{ENGINE_LABELS[p.engine]} needs {mem.peak / GB:.1f} GB per GPU for the {_size(p.shape.params)} "
                f"model at micro batch {p.batch.micro_batch} x {p.seq_len} tokens (states {mem.states / GB:.1f} GB, "
                f"activations {mem.activations / GB:.1f} GB)")
    what += f", {p.gpu.name} has {p.budget / GB:.0f} GB usable"
    fixes = []
    most = p.largest_micro(p.engine, ckpt)
    if most:
        fixes.append(f"--batch.micro_batch_sizes {most} (the largest that fits)")
    elif not ckpt and p.largest_micro("fsdp2", True) and not p.largest_micro("fsdp2", False):
        fixes.append("activation checkpointing (--train.engine fsdp2 --fsdp2.activation_checkpointing true)")
    # train.py checkpoints activations under FSDP2 only (fsdp2.activation_checkpointing)
    others = [e for e in ENGINES if e != p.engine and p.largest_micro(e, ckpt and e == "fsdp2")]
    fixes += [_engine_option(e) for e in others[:2]]
    if not most and not others:  # more GPUs: the config's engine if it shards, else ZeRO-3; or FSDP2 with AC
        engine = p.engine if p.engine != "zero0" else "zero3"
        found = False
        for n in (2 ** i for i in range(1, 16)):
            for e, ac in ((engine, ckpt and engine == "fsdp2"), ("zero3", False), ("fsdp2", True)):
                more = replace(p.strategies[e], world=p.world * n, activation_checkpointing=ac)
                if not found and largest_micro_batch(p.shape, more, p.seq_len, p.budget):
                    option = "" if e == p.engine and ac == ckpt else _engine_option(e) + (
                        " --fsdp2.activation_checkpointing true" if ac and not ckpt else "")
                    fixes.append(f"{option + ' with ' if option else ''}{p.world * n} GPUs or more (--nodes "
                                 f"{p.nodes * n} at --gpus-per-node {p.gpus_per_node})")
                    found = True
            if found:
                break
    return what + ": use " + (" or ".join(fixes) if fixes else "a larger GPU (--gpu)")


def main(argv: list[str] | None = None) -> int:
    """``bigbatch plan --config C --nodes N --gpus-per-node G [--gpu KIND] [--json] [--section.key VALUE ...]``."""
    from bigbatch.training.config import load_config, parse_overrides

    p = ArgumentParser(prog="bigbatch plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default=DEFAULT_GPU, help=f"one of {', '.join(GPUS)}")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")

    def body() -> int:
        args, rest = p.parse_known_args(argv)
        for name in ("nodes", "gpus_per_node"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
        if args.gpu not in GPUS:
            raise ConfigError(f"--gpu: {args.gpu!r} is not known; choose one of {list(GPUS)}")
        cfg = load_config(args.config, parse_overrides(rest))
        plan = plan_run(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu)
        problem = fit_problem(plan)
        if problem:
            raise ConfigError(problem)
        print(json.dumps(plan.to_dict()) if args.json else plan.render(), flush=True)
        return 0

    return command_main(body)


# ---------------------------------------------------------------- at the start and the end of a run


@dataclass
class PlannedMemory:
    """What the run's plan predicted per process (bytes) and where its measurement starts."""

    predicted: float
    device: str  # cuda | cpu
    baseline: float  # CPU: resident bytes when the plan was made (the peak is measured above it)
    summary: str


def submit_summary(command: list[str], workdir: str, nodes: int, workers_per_node: int, gpus: bool) -> str | None:
    """The plan's one line for a ``train.py`` command that ``bigbatch submit`` is about to queue (resolved in
    ``workdir``), or why there is none; None for another command."""
    from bigbatch.training.run_dir import resolve_train_command

    try:
        resolved = resolve_train_command(command, workdir, overwrite=True)
        if resolved is None:
            return None
        return plan_run(resolved[0], nodes=nodes, gpus_per_node=workers_per_node, gpu=None,
                        device="cuda" if gpus else "cpu", with_cost=gpus).summary()
    except ConfigError as exc:
        return f"plan: none ({exc})"


def _status_bytes(field_name: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return float(line.split()[1]) * 1024
    return float("nan")


def announce(cfg: RunConfig, info, tokenizer_size: int, seq_len: int, *,
             global_batch: int | None = None) -> PlannedMemory | None:
    """At the start of a run, before the model is built: print the plan's one-line summary on the main rank and
    start measuring the peak (CUDA: reset the allocator's peak; CPU: reset the kernel's high-water mark of
    resident memory). Returns what :func:`check_peak` needs; None (and a note) when no plan can be made."""
    import torch

    on_gpu = info.device.type == "cuda"
    gpu = None
    if on_gpu:
        gpu = gpu_named(torch.cuda.get_device_name(info.device))
    local = max(1, getattr(info, "local_world_size", 1))
    try:
        plan = plan_run(cfg, nodes=max(1, info.world_size // local), gpus_per_node=local, gpu=gpu,
                        tokenizer_size=tokenizer_size, seq_len=seq_len, world_size=info.world_size,
                        device=info.device.type, with_cost=on_gpu, global_batch=global_batch)
        line = plan.summary()
    except Exception as exc:  # noqa: BLE001 - the plan informs; it never stops a run (which checks its own input)
        if info.is_main:
            print(f"plan: none ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        return None
    if info.is_main:
        print(line, flush=True)
        problem = fit_problem(plan)
        if problem:
            print(f"warning: {problem}", file=sys.stderr, flush=True)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(info.device)
        baseline = float(torch.cuda.memory_allocated(info.device))
    else:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        baseline = _status_bytes("VmRSS")
    return PlannedMemory(plan.memory_for(plan.engine).peak, "cuda" if on_gpu else "cpu", baseline, line)


def measured_peak(planned: PlannedMemory) -> float:
    """The peak since :func:`announce` (bytes above its baseline): CUDA's max_memory_allocated, or on CPU the
    resident high-water mark (VmHWM)."""
    if planned.device == "cuda":
        from bigbatch.training.flops import cuda_run_peak_bytes

        return float(cuda_run_peak_bytes()) - planned.baseline
    return _status_bytes("VmHWM") - planned.baseline


def check_peak(planned: PlannedMemory | None, *, tolerance: float = PEAK_TOLERANCE, say=None) -> str | None:
    """At the end of a run: a warning (returned, and passed to ``say`` or printed on stderr) when the measured
    peak exceeds the plan's prediction by more than ``tolerance``; None otherwise."""
    if planned is None or not planned.predicted:
        return None
    peak = measured_peak(planned)
    # a small model's peak is the process's own overhead (libraries, data, allocator), which the plan leaves out
    if not math.isfinite(peak) or peak <= tolerance * planned.predicted or peak - planned.predicted < PEAK_SLACK:
        return None
    what = "CUDA max_memory_allocated" if planned.device == "cuda" else "resident memory above the start"
    text = (f"measured peak memory {peak / GB:.2f} GB per process is {peak / planned.predicted:.2f} x the plan's "
            f"{planned.predicted / GB:.2f} GB ({what}); "
            "the plan (bigbatch.scaling.memory) underestimates this run")
    (say or (lambda t: print(f"warning: {t}", file=sys.stderr, flush=True)))(text)
    return text
