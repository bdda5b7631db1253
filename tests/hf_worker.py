"""Real HF Trainer runs with bigbatch's optimizers, for tests/test_hf.py.

Launched by ``torchrun --nproc_per_node N tests/hf_worker.py OUT_DIR CASE...``; runs every case in
the one process group and writes ``OUT_DIR/<case>.json`` (rank 0) with what was measured. Each case
asserts itself; a failure exits non-zero with the reason.
"""

from __future__ import annotations

import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from bigbatch.atomic import write_text
from bigbatch.optim import AdaBound, RAdam

from bigbatch.scaling import scale_hparams, scale_steps

REFERENCE_BATCH = 4
PER_DEVICE = 4
STEPS = 16  # at the reference batch; the scaling rules divide it by kappa
SAVE_AT = 4


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def dataset(n=64, seq=16):
    """Learnable sequences: start s, then (s + k * stride) mod vocab."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 64, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(seq)) % 64
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def ours(trainer):
    """Our optimizer inside whatever wrappers accelerate / DeepSpeed put around it."""
    seen, o = [], trainer.optimizer
    while o is not None and not isinstance(o, (AdaBound, RAdam)):
        seen.append(type(o).__name__)
        o = getattr(o, "optimizer", None)
    if o is None:
        raise AssertionError(f"no bigbatch optimizer inside {' -> '.join(seen)}")
    return o


def ds_config():
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
            "optimizer": {"type": "AMSBound", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                         "weight_decay": "auto", "final_lr": "auto", "gamma": "auto"}}}


CASES = {
    # name: (optim, optim_args, deepspeed)
    "adabound": ("adabound", "final_lr=0.05,gamma=0.002", None),
    "amsbound_zero2": (None, "final_lr=0.05", "dict"),
    "radam": ("radam", "decoupled_weight_decay=True", None),
}


def run(case, out_dir, *, resume_from=None, max_steps=STEPS):
    from bigbatch.hf import BigBatchTrainer, BigBatchTrainingArguments

    optim, optim_args, ds = CASES[case]
    kw = dict(optim=optim) if optim else {}
    args = BigBatchTrainingArguments(
        output_dir=os.path.join(out_dir, case), optim_args=optim_args, learning_rate=2e-2, weight_decay=0.01,
        per_device_train_batch_size=PER_DEVICE, gradient_accumulation_steps=1, max_steps=max_steps,
        warmup_steps=0, lr_scheduler_type="constant", logging_steps=1, save_steps=SAVE_AT, save_strategy="steps",
        report_to=[], seed=0, data_seed=0, disable_tqdm=True, reference_batch_size=REFERENCE_BATCH,
        deepspeed=ds_config() if ds else None, dataloader_num_workers=0, **kw)
    trainer = BigBatchTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    trainer.train(resume_from_checkpoint=resume_from)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return trainer, losses


def check_case(case, out_dir):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer, losses = run(case, out_dir)
    opt = ours(trainer)
    name = {"adabound": "adabound", "amsbound_zero2": "amsbound", "radam": "radam"}[case]
    kappa = world * PER_DEVICE / REFERENCE_BATCH
    # Reference hyperparameters as the user wrote them, scaled here independently of the callback.
    ref = {"lr": 2e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    ref.update({"adabound": {"final_lr": 0.05, "gamma": 0.002}, "amsbound_zero2": {"final_lr": 0.05, "gamma": 1e-3},
                "radam": {"decoupled_weight_decay": True}}[case])
    want = scale_hparams(name, ref, kappa)
    cls = {"adabound": AdaBound, "amsbound": AdaBound, "radam": RAdam}[name]
    assert isinstance(opt, cls), f"{case}: optimizer is {type(opt).__name__}, expected {cls.__name__}"
    if name == "amsbound":
        assert all(g["amsbound"] for g in opt.param_groups), f"{case}: amsbound flag off"
    assert len(opt.param_groups) == 2, f"{case}: {len(opt.param_groups)} param groups, expected decay + no-decay"
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays[0] == 0.0 and math.isclose(decays[1], want["weight_decay"], rel_tol=1e-12), \
        f"{case}: weight decays {decays}, expected [0, {want['weight_decay']}]"
    g = opt.param_groups[0]
    for k in ("lr", "eps", "final_lr", "gamma"):
        if k in want:
            assert math.isclose(g[k], want[k], rel_tol=1e-12), f"{case}: {k}={g[k]} expected {want[k]}"
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(g["betas"], want["betas"])), \
        f"{case}: betas={g['betas']} expected {want['betas']}"
    n_steps = scale_steps(STEPS, kappa)
    steps = sorted(losses)
    assert steps[-1] == n_steps, f"{case}: ran to step {steps[-1]}, expected {n_steps} = {STEPS} / kappa"
    first, last = sum(losses[s] for s in steps[:2]) / 2, sum(losses[s] for s in steps[-2:]) / 2
    # RAdam runs un-adapted (SGD-like) for its first ~5 steps, so it falls least: 0.1 nat is the bar.
    assert last < first - 0.1, f"{case}: loss did not fall ({first:.4f} -> {last:.4f})"
    is_ds = trainer.is_deepspeed_enabled
    assert is_ds == (CASES[case][2] is not None), f"{case}: deepspeed enabled={is_ds}"
    if is_ds:
        stage = trainer.model_wrapped.zero_optimization_stage()
        assert stage == 2 and trainer.model_wrapped.world_size == world, \
            f"{case}: DeepSpeed stage {stage} world {trainer.model_wrapped.world_size}"
    assert trainer.args.world_size == world, f"{case}: Trainer world_size {trainer.args.world_size} != {world}"

    # Resume from the step-4 checkpoint in a fresh Trainer: same losses for steps 5..8.
    ckpt = os.path.join(out_dir, case, f"checkpoint-{SAVE_AT}")
    assert os.path.isdir(ckpt), f"{case}: no checkpoint at {ckpt}"
    resumed, losses2 = run(case, out_dir + "_resume", resume_from=ckpt)
    opt2 = ours(resumed)
    st = next(iter(opt2.state.values()))
    assert int(st["step"]) == n_steps, f"{case}: resumed optimizer state step {int(st['step'])} != {n_steps}"
    cont = {s: losses2[s] for s in losses2 if s > SAVE_AT}
    assert sorted(cont) == list(range(SAVE_AT + 1, n_steps + 1)), f"{case}: resumed steps {sorted(losses2)}"
    diff = max(abs(cont[s] - losses[s]) for s in cont)
    assert diff < 1e-4, f"{case}: resumed losses differ from the uninterrupted run by {diff:.3g}: {cont} vs {losses}"
    return {"case": case, "world_size": world, "kappa": kappa, "optimizer": type(opt).__name__,
            "hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"},
            "expected": {k: (list(v) if isinstance(v, tuple) else v) for k, v in want.items()},
            "losses": losses, "steps": n_steps, "resume_max_abs_diff": diff, "deepspeed": is_ds}


def main(argv):
    out_dir, cases = argv[0], argv[1:]
    results = {}
    for case in cases:
        results[case] = check_case(case, out_dir)
        # accelerate.Accelerator exports ACCELERATE_USE_DEEPSPEED=true for the rest of the process; the
        # next TrainingArguments would then turn DeepSpeed on by itself. One case must not leak into the next.
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        for case, res in results.items():
            write_text(os.path.join(out_dir, f"{case}.json"), json.dumps(res, indent=1))
            print(f"OK {case}: world={res['world_size']} kappa={res['kappa']} loss {res['losses'][1]:.4f} -> "
                  f"{res['losses'][max(res['losses'])]:.4f}, resume diff {res['resume_max_abs_diff']:.2g}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
