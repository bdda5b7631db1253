"""``--batch_schedule auto`` in the HF Trainer against the constant batch, on configs/tiny.yaml's model
(the 0.7M-parameter Llama), optimizer (AdaBound lr 3e-3, betas 0.9/0.99, final_lr 10, gamma 1e-3,
grad clip 1), cosine schedule (warmup 40,960 tokens, min lr 0.1 x) and embedded corpus (bigbatch's
data helpers: the same tokenizer and packed blocks as train.py).

Both runs are a plain HF ``Trainer`` built by ``bigbatch.hf`` (BigBatchTrainingArguments), 1 process,
global batch 16 = 8 x 2 accumulation at the start (the auto run needs >= 2 micro batches to measure
B_noise); the auto run grows through gradient accumulation up to ``--max-batch``. Each run is its own
process with ``--threads`` threads. Printed: each run's eval loss (the first 128 validation blocks),
optimizer steps, the batches the auto run went through with B_noise, and the ratios. Goal: the auto
run within 1% of the constant batch's eval loss with >= 25% fewer optimizer steps.

    nice python benchmarks/hf_auto_batch.py [--tokens 800000] [--threads 2] [--max-batch 64] [--parallel] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REFERENCE_BATCH = 16  # configs/tiny.yaml: batch.reference_global_batch
PER_DEVICE = 8


def tiny_data():
    """``(cfg, packed data, vocab)`` of configs/tiny.yaml (tokenizer and blocks cached as train.py does)."""
    from bigbatch.training.config import load_config
    from bigbatch.training.corpus import load_corpus
    from bigbatch.training.data import build_packed_data
    from bigbatch.training.tokenizer import build_tokenizer

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    corpus = load_corpus(cfg.data)
    tok = build_tokenizer(cfg.tokenizer, corpus, cfg.data.cache_dir)
    return cfg, build_packed_data(corpus, tok, cfg.data), tok


def one_run(case: str, tokens: int, max_batch: int, out: str) -> dict:
    import torch
    from datasets import Dataset

    from bigbatch.hf import BigBatchTrainer, BigBatchTrainingArguments
    from bigbatch.training.model import build_model, padded_vocab

    cfg, data, tok = tiny_data()
    seq = data.seq_len
    n_train = tokens // seq
    train = Dataset.from_dict({"input_ids": data.train[:n_train].astype("int64").tolist()})
    train = train.map(lambda b: {"labels": b["input_ids"]}, batched=True)
    val_ids = data.val[:cfg.train.eval_blocks].astype("int64").tolist()
    val = Dataset.from_dict({"input_ids": val_ids, "labels": val_ids})
    model = build_model(cfg.model, padded_vocab(cfg.model, len(tok)), seq, seed=cfg.train.seed,
                        eos_token_id=tok.eos_token_id)
    hp = cfg.optim.hparams
    steps = n_train // REFERENCE_BATCH
    warmup = round(cfg.schedule.warmup_tokens / (REFERENCE_BATCH * seq))
    kw = dict(batch_schedule="auto", max_global_batch=max_batch) if case == "auto" else {}
    args = BigBatchTrainingArguments(
        output_dir=os.path.join(out, case), optim=cfg.optim.name,
        optim_args=f"final_lr={hp['final_lr']!r},gamma={hp['gamma']!r}", learning_rate=hp["lr"],
        adam_beta1=hp["betas"][0], adam_beta2=hp["betas"][1], adam_epsilon=hp["eps"], weight_decay=hp["weight_decay"],
        max_grad_norm=cfg.optim.grad_clip, per_device_train_batch_size=PER_DEVICE,
        gradient_accumulation_steps=REFERENCE_BATCH // PER_DEVICE, max_steps=steps, warmup_steps=warmup,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": cfg.schedule.min_lr_ratio},
        per_device_eval_batch_size=16, logging_steps=cfg.train.log_every, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, **kw)
    trainer = BigBatchTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    t0 = time.time()
    trainer.train()
    ev = trainer.evaluate()
    hist = trainer.state.log_history
    changes = [{k.split("/")[1]: h[k] for k in h if k.startswith("batch_change/")} | {"step": h["step"]}
               for h in hist if "batch_change/global_batch" in h]
    noise = [h["batch_decision/noise_scale"] for h in hist if h.get("batch_decision/noise_scale") is not None]
    schedules = [c for c in trainer.callback_handler.callbacks if hasattr(c, "history")]
    samples = schedules[0].samples if schedules else trainer.state.global_step * REFERENCE_BATCH
    return {"case": case, "eval_loss": ev["eval_loss"], "steps": trainer.state.global_step,
            "tokens": samples * seq, "changes": changes, "noise_scale_logged": noise[-5:],
            "train_loss_last": [h["loss"] for h in hist if "loss" in h][-1], "seconds": time.time() - t0,
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=800_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--out", default="runs/hf_auto_batch")
    ap.add_argument("--cases", nargs="+", default=["constant", "auto"], choices=["constant", "auto"])
    ap.add_argument("--parallel", action="store_true", help="run the cases at the same time (a process each)")
    ap.add_argument("--one", choices=["constant", "auto"], help=argparse.SUPPRESS)  # a run, in its own process
    a = ap.parse_args(argv)
    if a.one:
        import torch

        torch.set_num_threads(a.threads)
        res = one_run(a.one, a.tokens, a.max_batch, a.out)
        Path(a.out, f"{a.one}.json").write_text(json.dumps(res, indent=1))
        return 0
    os.makedirs(a.out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    procs = []
    for case in a.cases:
        procs.append(subprocess.Popen([sys.executable, __file__, "--one", case, "--tokens", str(a.tokens), "--threads",
                                       str(a.threads), "--max-batch", str(a.max_batch), "--out", a.out], env=env))
        if not a.parallel:
            procs[-1].wait()
    if any(p.wait() for p in procs):
        print("a run failed", file=sys.stderr)
        return 1
    res = {c: json.loads(Path(a.out, f"{c}.json").read_text()) for c in a.cases}
    for c, r in res.items():
        print(f"{c:9s} eval loss {r['eval_loss']:.4f}  optimizer steps {r['steps']}  tokens {r['tokens']:,}  "
              f"last train loss {r['train_loss_last']:.4f}  ({r['seconds']:.0f} s, {r['torch_threads']} threads)")
    if len(res) == 2:
        c, d = res["constant"], res["auto"]
        for ch in d["changes"]:
            print(f"  auto: step {ch['step']}: global batch {ch['old_global_batch']:.0f} -> {ch['global_batch']:.0f} at "
                  f"{ch['samples'] * 128:,.0f} tokens, B_noise {ch['noise_scale']:.1f}")
        gap = d["eval_loss"] / c["eval_loss"] - 1
        fewer = 1 - d["steps"] / c["steps"]
        print(f"auto / constant: eval loss ratio {d['eval_loss'] / c['eval_loss']:.4f} ({gap:+.2%}), optimizer steps "
              f"ratio {d['steps'] / c['steps']:.3f} ({fewer:.1%} fewer); goal: within 1% with >= 25% fewer: "
              f"{'met' if abs(gap) <= 0.01 and fewer >= 0.25 and d['changes'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
