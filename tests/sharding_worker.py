"""Run a list of DeepSpeed cases in ONE process group of ``--world`` real processes (gloo, CPU).

    python tests/sharding_worker.py --world 2 --cases cases.json --out results.json

Each case builds a fresh engine with ``bigbatch.sharding.build_engine``; rank 0 writes
``{case name: result}`` to ``--out`` (an ``"error"`` entry holds a traceback). The pytest files
compare the results against unsharded single-process runs.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist


import noise_problem
import case_runner
import sharding_common as common


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _tolist(full: dict) -> dict:
    return {n: {"fp32": e["fp32"].tolist(), "state": {k: v.tolist() for k, v in e["state"].items()}}
            for n, e in full.items()}


def _plan(case: dict, world: int):
    """A BatchPlan (bigbatch.scaling.planner) for the case's global batch, or None."""
    if "plan" not in case:
        return None
    from bigbatch.scaling.planner import plan_batch

    p = case["plan"]
    return plan_batch(world, p["micro_batch_sizes"], reference_global_batch=p["reference_global_batch"],
                      optimizer=case["opt"], hparams=common.ctor_hparams(case["opt"]), policy=p["policy"],
                      global_batch=p.get("global_batch"), per_device_batch=p.get("per_device_batch"))


def _build(case: dict, world: int, plan=None):
    from bigbatch.sharding import build_engine

    model = common.make_gpt2() if case.get("model") == "gpt2" else common.make_model(case.get("seed", 0))
    extra = {}
    if case.get("bf16"):
        extra["bf16"] = {"enabled": True}
    if case.get("offload"):
        extra_zero = {"offload_optimizer": {"device": "cpu"}}
    else:
        extra_zero = {}
    if "config" in case:  # a shipped JSON, with what the batch planner would fill given by hand
        from bigbatch.sharding import load_ds_config

        cfg = load_ds_config(case["config"])
        cfg.update(train_batch_size=case["gb"], gradient_accumulation_steps=case["gas"],
                   optimizer={"type": common.TYPE_NAMES[case["opt"]], "params": dict(common.HPARAMS[case["opt"]])})
    else:
        cfg = common.ds_config(case["opt"], case["stage"], case["gb"], case["gas"], **extra)
        cfg["zero_optimization"].update(extra_zero)
    if plan is not None:
        for k in ("train_batch_size", "gradient_accumulation_steps"):
            cfg[k] = "auto"
        cfg["optimizer"]["params"] = {"foreach": True}
    use_groups = case.get("groups", True) and case.get("model") != "gpt2"
    groups = common.param_groups(model, common.HPARAMS[case["opt"]]["lr"]) if use_groups else None
    sched = common.warmup if case.get("sched", True) else None
    engine, _, _ = build_engine(model, cfg, plan=plan, param_groups=groups, lr_scheduler=sched)
    return engine


def _train(engine, start: int, steps: int, world: int, rank: int) -> list[float]:
    gb, mb, gas = engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(), \
        engine.gradient_accumulation_steps()
    dtype = next(engine.module.parameters()).dtype
    lm = hasattr(engine.module, "config")  # the GPT-2 case: token batches, the model's own LM loss
    losses = []
    for t in range(start, start + steps):
        total = torch.zeros((), dtype=torch.float64)
        for m in range(gas):
            if lm:
                lo = (m * world + rank) * mb
                ids = common.token_batch(t, gb)[lo:lo + mb]
                loss = engine(input_ids=ids, labels=ids).loss
            else:
                x, y = common.micro_batch(t, gb, world, rank, mb, m)
                loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
            engine.backward(loss)
            engine.step()
            total += loss.detach().double()
        total /= gas
        dist.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def _noise_scale(case: dict, world: int, rank: int):
    """The gradient noise scale of a DeepSpeed engine on a problem whose B_noise is known, measured as
    train.py does it: probe hooks for the micro-batch norms, step_with_grad_norm for the reduced one."""
    from bigbatch.scaling import NoiseScaleProbe
    from bigbatch.sharding import build_engine, reports_grad_norm, step_with_grad_norm

    model = noise_problem.Quadratic(torch.float32)
    truth = {"true_b_noise": noise_problem.TRUE_B_NOISE, "true_trace": model.trace,
             "true_grad_sq": float(model.theta.detach().double().square().sum())}  # before ZeRO-3 partitions it
    cfg = common.ds_config("radam", case["stage"], case["gb"], case["gas"])
    cfg["optimizer"]["params"] = {"lr": 0.0}  # theta stays put, so G and Sigma stay known
    engine, _, _ = build_engine(model, cfg)
    mb, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    probe = NoiseScaleProbe(engine.module.parameters(), mb, micro_grad_scale=gas)
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(case["steps"]):
        for m in range(gas):
            engine.backward(engine(model.sample(mb, gen)))
            probe.micro_step_done()
            if m < gas - 1:
                engine.step()
            else:
                norm = step_with_grad_norm(engine)
        est = probe.step_done(global_sq_norm=norm**2)
    probe.remove()
    out = {"b_noise": est.b_noise, "trace": est.trace_sigma, "grad_sq": est.grad_sq,
           "reports_grad_norm": reports_grad_norm(engine), **truth}
    return engine, out


def run_case(case: dict, world: int, rank: int) -> dict:
    from bigbatch.sharding import CheckpointError, load_checkpoint, save_checkpoint
    from bigbatch.sharding import deepspeed_state as st
    from bigbatch.sharding.full_state import read_parts
    from bigbatch.sharding.tags import META

    kind = case["kind"]
    out: dict = {}
    if kind == "train":
        engine = _build(case, world)
        out["losses"] = _train(engine, 0, case["steps"], world, rank)
        out["full"] = _tolist(st.gather_full_state(engine))
        out["micro_batch"] = engine.train_micro_batch_size_per_gpu()
        out["stage"] = st.stage_of(engine)
        out["bf16"] = next(engine.module.parameters()).dtype == torch.bfloat16
    elif kind == "save":
        engine = _build(case, world)
        out["losses"] = _train(engine, 0, case["steps"], world, rank)
        out["path"] = save_checkpoint(engine, case["dir"], tag=case.get("tag"),
                                      client_state={"data_position": case["steps"]})
        out["rng_after_save"] = torch.rand(3).tolist()  # resume must draw the same numbers
        if case.get("continue_steps"):  # the uninterrupted run, for a resume at another world size
            out["losses_after"] = _train(engine, case["steps"], case["continue_steps"], world, rank)
    elif kind == "resume":
        plan = _plan(case, world)
        engine = _build(case, world, plan)
        capture = _Capture()
        logging.getLogger("bigbatch").addHandler(capture)
        logging.getLogger("bigbatch").setLevel(logging.INFO)
        try:
            client = load_checkpoint(engine, case["dir"], tag=case.get("tag"), plan=plan)
        finally:
            logging.getLogger("bigbatch").removeHandler(capture)
        out["client_state"] = client
        out["rng_after_load"] = torch.rand(3).tolist()
        out["log"] = capture.messages
        out["global_steps"] = engine.global_steps
        out["group_hparams"] = [{k: v for k, v in g.items() if k != "params"}
                                for g in engine.basic_optimizer.param_groups]
        out["group_steps"] = st.group_steps(engine)
        full = st.gather_full_state(engine)
        meta = torch.load(os.path.join(_tag_dir(case), META), weights_only=False)
        saved, _ = read_parts(_tag_dir(case), meta["full_state_parts"])
        diffs, ratios = {}, {}
        for name, entry in saved.items():
            diffs[f"{name}/fp32"] = float((full[name]["fp32"] - entry["fp32"]).abs().max())
            for k, v in entry["state"].items():
                diffs[f"{name}/{k}"] = float((full[name]["state"][k] - v).abs().max()) if k in full[name]["state"] \
                    else float("inf")
                if k in full[name]["state"] and v.dim() and bool((v != 0).any()):  # loaded / saved, where saved != 0
                    r = full[name]["state"][k][v != 0] / v[v != 0]
                    lo, hi = ratios.get(k, (float("inf"), float("-inf")))
                    ratios[k] = (min(lo, float(r.min())), max(hi, float(r.max())))
        out["state_diffs"] = diffs
        out["state_ratios"] = ratios
        out["state_keys"] = sorted({k for e in full.values() for k in e["state"]})
        if case.get("more_steps"):
            out["losses"] = _train(engine, case["start"], case["more_steps"], world, rank)
            out["full"] = _tolist(st.gather_full_state(engine))
    elif kind == "noise":
        engine, out = _noise_scale(case, world, rank)
    elif kind == "set_batch":
        from bigbatch.sharding import set_engine_batch

        engine = _build(case, world)
        _train(engine, 0, case["steps"], world, rank)
        out["before"] = {"global_batch": engine.train_batch_size(), "accum": engine.gradient_accumulation_steps()}
        mb = engine.train_micro_batch_size_per_gpu()
        set_engine_batch(engine, mb, 2 * engine.gradient_accumulation_steps())
        out["after"] = {"global_batch": engine.train_batch_size(), "accum": engine.gradient_accumulation_steps()}
        out["boundaries"], out["global_steps"] = [], [engine.global_steps]
        for m in range(8):
            x, y = common.micro_batch(case["steps"] + m // 4, engine.train_batch_size(), world, rank, mb, m % 4)
            out["boundaries"].append(engine.is_gradient_accumulation_boundary())
            engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y))
            engine.step()
            out["global_steps"].append(engine.global_steps)
    elif kind == "atomic":
        engine = _build(case, world)
        d = case["dir"]
        _train(engine, 0, 3, world, rank)
        save_checkpoint(engine, d, tag="good")
        _train(engine, 3, 2, world, rank)
        save_checkpoint(engine, d, tag="broken")
        if rank == 0:  # truncate a full-state part after the save completed
            victim = sorted(f for f in os.listdir(os.path.join(d, "broken")) if "full_state_part" in f)[0]
            path = os.path.join(d, "broken", victim)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        dist.barrier()
        try:
            load_checkpoint(engine, d)
            out["refused"] = None
        except CheckpointError as exc:
            out["refused"] = str(exc)
        engine2 = _build(case, world)
        load_checkpoint(engine2, d, fallback=True)
        out["fallback_global_steps"] = engine2.global_steps
        out["fallback_losses"] = _train(engine2, 3, 2, world, rank)
        engine = engine2
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    engine.destroy()
    return out


def _tag_dir(case):
    from bigbatch.sharding.tags import read_latest

    return os.path.join(case["dir"], case.get("tag") or read_latest(case["dir"]))


if __name__ == "__main__":
    case_runner.main(run_case, deepspeed=True)
