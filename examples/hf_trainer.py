"""HF Trainer with a bigbatch optimizer, optionally under DeepSpeed, with the scaling rules on.

    python examples/hf_trainer.py --output_dir /tmp/run --optim adabound --optim_args "final_lr=0.1,gamma=1e-3" \
        --learning_rate 1e-2 --per_device_train_batch_size 4 --max_steps 40 --reference_batch_size 4
    torchrun --nproc_per_node 2 examples/hf_trainer.py --output_dir /tmp/run --optim radam \
        --learning_rate 1e-2 --per_device_train_batch_size 4 --max_steps 40 --reference_batch_size 4 \
        --deepspeed configs/deepspeed/zero2.json

Every ``TrainingArguments`` flag works; ``--optim`` also takes ``adabound``, ``amsbound`` and ``radam``;
``--reference_batch_size`` is the global batch the flags were tuned at (the run scales lr, betas,
eps, bounds and the step counts to its own global batch and logs them). The model is a tiny Llama
built from a config and the data a small in-memory set, so the script runs anywhere, offline. The
loss is logged every 5 steps unless ``--logging_steps`` says otherwise.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM  # noqa: E402

from bigbatch.hf import BigBatchTrainer, BigBatchTrainingArguments  # noqa: E402


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def dataset(n=256, seq=16):
    g = torch.Generator().manual_seed(1)
    start, stride = torch.randint(0, 64, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    ids = ((start + stride * torch.arange(seq)) % 64).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.split("=")[0] == "--logging_steps" for a in argv):
        argv += ["--logging_steps", "5"]  # the Trainer's 500 would log no loss in a short run
    (args,) = HfArgumentParser(BigBatchTrainingArguments).parse_args_into_dataclasses(argv)
    trainer = BigBatchTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if args.process_index == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        inner = trainer.optimizer
        while hasattr(inner, "optimizer"):
            inner = inner.optimizer
        print(f"optimizer {type(inner).__name__}: lr={inner.param_groups[0]['lr']:.6g}; "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {trainer.state.global_step} steps", flush=True)


if __name__ == "__main__":
    main()
