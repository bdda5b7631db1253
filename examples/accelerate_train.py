"""Train a tiny Llama with ``accelerate`` and a bigbatch optimizer (with or without DeepSpeed).

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --optimizer adabound
    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 examples/accelerate_train.py --optimizer radam
    accelerate launch --use_deepspeed --deepspeed_config_file configs/deepspeed/zero2.json --num_processes 2 \
        examples/accelerate_train.py --optimizer amsbound

Without a GPU, ``--multi_gpu`` still starts the processes (gloo on CPU); ``--cpu`` would start
only one, whatever ``--num_processes`` says. The hyperparameters are given at ``--reference-batch-size``; the script plans the run's global batch
(processes x ``--per-device-batch`` x ``--grad-accum``) and scales them by bigbatch's rules, and the lr
schedule is defined in samples. With ``--out FILE`` rank 0 writes what ran (optimizer class, its
hyperparameters, losses) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bigbatch.hf import decay_groups, init_distributed_state, take_optimizer_block  # noqa: E402
from bigbatch.optim import get_optimizer_class  # noqa: E402
from bigbatch.scaling import SampleSchedule, plan_batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", default="adabound", help="adabound, amsbound or radam")
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--final-lr", type=float, default=0.05, help="AdaBound/AMSBound only")
    p.add_argument("--gamma", type=float, default=1e-3, help="AdaBound/AMSBound only")
    p.add_argument("--reference-batch-size", type=int, default=4)
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--samples", type=int, default=128, help="training length in samples")
    p.add_argument("--warmup-samples", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def data(n=256, seq=16):
    g = torch.Generator().manual_seed(1)
    start, stride = torch.randint(0, 64, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(seq)) % 64


def main(argv=None):
    a = parse_args(argv)
    cls = get_optimizer_class(a.optimizer)  # a bad name fails here, listing the known ones
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    init_distributed_state(use_deepspeed=use_ds)  # the right world size on CPU hosts
    accelerator = Accelerator(gradient_accumulation_steps=a.grad_accum)

    reference = {"lr": a.lr, "betas": tuple(a.betas), "eps": a.eps, "weight_decay": a.weight_decay}
    if a.optimizer.lower() in ("adabound", "amsbound"):
        reference.update(final_lr=a.final_lr, gamma=a.gamma)
    block = take_optimizer_block(accelerator, a.optimizer)
    if block is not None:
        if block.name != cls.__name__.lower() and block.name != a.optimizer.lower():
            raise ValueError(f"--optimizer {a.optimizer} but the DeepSpeed config names {block.name}")
        reference.update({k: v for k, v in block.params.items() if not (isinstance(v, str) and v == "auto")})
    plan = plan_batch(accelerator.num_processes, [a.per_device_batch], reference_global_batch=a.reference_batch_size,
                      optimizer=a.optimizer, hparams=reference, policy="scale",
                      per_device_batch=a.per_device_batch * a.grad_accum)
    hp = dict(plan.hparams)
    model = tiny_model()
    optimizer = cls(decay_groups(model, hp.pop("weight_decay")), **hp)
    sched = SampleSchedule(warmup=a.warmup_samples, total=a.samples, decay="constant")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sched.lr_lambda(plan.global_batch))
    loader = torch.utils.data.DataLoader(data(), batch_size=a.per_device_batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(2))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.print(f"bigbatch: {cls.__name__} on {accelerator.num_processes} processes "
                      f"({accelerator.distributed_type}), global batch {plan.global_batch}, kappa={plan.kappa:g}: {plan.hparams}")

    steps, losses, it = sched.total_steps(plan.global_batch), [], iter(loader)
    model.train()
    while len(losses) < steps:
        for _ in range(a.grad_accum):
            try:
                ids = next(it)
            except StopIteration:
                it = iter(loader)
                ids = next(it)
            with accelerator.accumulate(model):
                loss = model(input_ids=ids, labels=ids).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())

    inner = optimizer
    while not isinstance(inner, cls) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    result = {"optimizer": type(inner).__name__, "is_ours": isinstance(inner, cls),
              "param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                               for g in inner.param_groups],
              "expected": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.hparams.items()},
              "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
              "zero_stage": engine.engine.zero_optimization_stage() if engine is not None else None,
              "ds_world_size": engine.engine.world_size if engine is not None else None,
              "kappa": plan.kappa, "steps": steps, "losses": losses}
    if a.out and accelerator.is_main_process:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.out)
    accelerator.print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps")
    accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    main()
