"""Pretrain a causal language model with bigbatch.

    python train.py --config configs/tiny.yaml --out runs/tiny [--section.key VALUE ...]
    torchrun --standalone --nproc_per_node 2 train.py --config configs/tiny.yaml --out runs/tiny
    python train.py --resume runs/tiny [--section.key VALUE ...]   # latest good checkpoint, any world size

Flow: YAML + overrides -> RunConfig -> tokenizer, packed data, model, batch plan (global batch and
hyperparameters scaled from the reference batch), DeepSpeed engine -> loop. Outputs in --out:
metrics.jsonl, config.resolved.yaml, checkpoints/, tensorboard/, loss.png.

Exit codes: 0 finished; 2 bad input (config, files, corpus, batch); 75 (checkpoint.preempt_exit_code)
stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job with --resume OUT (--resume on a
directory with no checkpoint yet starts from step 0, so a requeue script can always pass it). Under
torchrun the workers exit 75 but torchrun itself reports 1; the checkpoint is complete either way
(torchrun gives workers 30 s after forwarding SIGTERM before it kills them).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from bigbatch.sharding import step_with_grad_norm
from bigbatch.training import distributed as bbdist
from bigbatch.training import engine as bbengine
from bigbatch.training.config import (ConfigError, RunConfig, apply_overrides, config_from_dict, dump_yaml,
                                      load_config, parse_overrides)
from bigbatch.training.corpus import load_corpus
from bigbatch.training.data import GlobalBatchLoader, build_packed_data, eval_batches
from bigbatch.training.metrics import MetricsLogger, Progress, plot_losses, truncate_metrics
from bigbatch.training.model import count_parameters
from bigbatch.training.tokenizer import build_tokenizer

RUN_FILES = ("metrics.jsonl", "config.resolved.yaml", "checkpoints", "tensorboard", "loss.png")
EXIT_BAD_INPUT = 2


# ------------------------------------------------------------------------------ setup


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML (configs/*.yaml)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    args, rest = p.parse_known_args(argv)
    return args, parse_overrides(rest)


def resolve_run(args, overrides) -> tuple[RunConfig, str, bool]:
    """(config, out dir, resuming). Refuses to touch an existing run without --resume/--overwrite."""
    if args.resume:
        out = args.resume
        if args.out and os.path.abspath(args.out) != os.path.abspath(out):
            raise ConfigError(f"--out {args.out!r} and --resume {out!r} differ; give only --resume")
        saved = os.path.join(out, "config.resolved.yaml")
        if args.config:
            cfg = load_config(args.config, overrides)
        elif os.path.isfile(saved):
            import yaml

            with open(saved) as fh:
                data = yaml.safe_load(fh)
            data.pop("resolved", None)
            cfg = apply_overrides(config_from_dict(data), overrides)  # overrides still win
        else:
            raise ConfigError(f"--resume: {out!r} has no config.resolved.yaml; give --config too")
        return cfg, out, True
    if not args.out:
        raise ConfigError("--out: required (the run directory), or --resume DIR")
    if not args.config:
        raise ConfigError("--config: required (a run config such as configs/tiny.yaml)")
    cfg = load_config(args.config, overrides)
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if existing and not args.overwrite:
        raise ConfigError(f"--out: {args.out!r} already holds a run ({', '.join(existing)}); "
                          "pass --resume DIR to continue it or --overwrite to replace it")
    return cfg, args.out, False


def clear_run(out: str) -> None:
    """--overwrite: remove only what a run writes (never other files in the directory)."""
    import shutil

    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def prepare_data(cfg: RunConfig, info):
    """Tokenizer and packed blocks. Local rank 0 builds the caches, the others then read them;
    an error on the builder is re-raised on every rank (no rank is left waiting)."""
    corpus = load_corpus(cfg.data)
    error = None
    if info.local_rank == 0:
        try:
            tok = build_tokenizer(cfg.tokenizer, corpus, cfg.data.cache_dir)
            build_packed_data(corpus, tok, cfg.data)
        except (ConfigError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ConfigError) else str(exc)
    errors = [error]
    if info.world_size > 1:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, error)
        errors = gathered
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)
    tok = build_tokenizer(cfg.tokenizer, corpus, cfg.data.cache_dir, train=False)
    return tok, build_packed_data(corpus, tok, cfg.data, build=False), corpus


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


@torch.no_grad()
def evaluate(engine, batches, device) -> float:
    """Mean cross-entropy (nats/token) over every rank's validation batches."""
    engine.eval()
    total, count = 0.0, 0
    for x in batches:
        x = x.to(device)
        loss = engine(input_ids=x, labels=x).loss
        n = x.numel() - x.shape[0]  # predicted positions
        total += float(loss) * n
        count += n
    engine.train()
    total, count = bbdist.all_reduce_sum([total, count])
    return total / max(count, 1)


def train_step(engine, micro_batches, device, *, probe=None, measure=False):
    """One optimizer step over this rank's micro batches (LongTensors (micro, seq_len)); DeepSpeed
    averages over accumulation and ranks and steps at the last one. Returns (mean loss on this rank,
    global grad norm before clipping)."""
    total, gnorm = 0.0, float("nan")
    for i, x in enumerate(micro_batches):
        x = x.to(device)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        if probe is not None:  # record this micro batch's gradient for the noise scale, or drop it
            probe.micro_step_done() if measure else probe.hook.collect()
        if i == len(micro_batches) - 1:
            gnorm = step_with_grad_norm(engine)
        else:
            engine.step()
        total += float(loss.detach())
    return total / len(micro_batches), gnorm


# ------------------------------------------------------------------------------ main


def train(cfg: RunConfig, out: str, resuming: bool, overwrite: bool) -> int:
    info = bbdist.init_distributed(cfg.train.threads)
    main_rank = info.is_main
    if main_rank:
        if overwrite and not resuming:
            clear_run(out)
        os.makedirs(out, exist_ok=True)
    tok, data, corpus = prepare_data(cfg, info)

    # Model and engine. The plan turns the reference batch/hparams into this world size's.
    run = bbengine.setup(cfg, info.world_size, tok, data.seq_len)
    plan, model, engine, optimizer, ds_config = run.plan, run.model, run.engine, run.optimizer, run.ds_config
    vocab = model.config.vocab_size
    peak_lrs = [g["lr"] for g in optimizer.param_groups]  # scaled by the plan; schedule multiplies
    schedule = bbengine.lr_schedule(cfg)  # in tokens: a batch change changes the step count only
    tokens_per_step = plan.global_batch * data.seq_len

    ckpt_dir = os.path.join(out, "checkpoints")
    step, samples, client = 0, 0, None
    if resuming and bbengine.has_checkpoint(ckpt_dir):
        client = bbengine.load_checkpoint(engine, ckpt_dir, plan=plan)
        step, samples = int(client["step"]), int(client["samples"])
    elif resuming and main_rank:  # a requeued job that never reached its first checkpoint
        print(f"--resume: no complete checkpoint in {ckpt_dir}; starting from step 0", flush=True)
    # Steps left = tokens left / tokens per step (after a batch change the step count changes).
    total_steps = step + max(0, math.ceil((cfg.train.tokens - samples * data.seq_len) / tokens_per_step))
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    if main_rank:
        truncate_metrics(os.path.join(out, "metrics.jsonl"), step)
        resolved = {
            "world_size": info.world_size, "backend": info.backend,
            "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(plan).items() if k != "hparams"},
            "scaled_hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.hparams.items()},
            "tokens_per_step": tokens_per_step, "total_steps": total_steps,
            "parameters": count_parameters(model), "vocab_size": vocab,
            "corpus": corpus.description, "data_cache": data.path, "train_blocks": int(len(data.train)),
            "val_blocks": int(len(data.val)), "precision": bbengine.precision_of(ds_config),
            "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
        }
        dump_yaml({**cfg.to_dict(), "resolved": resolved}, os.path.join(out, "config.resolved.yaml"))
        print(f"bigbatch: {count_parameters(model) / 1e6:.2f}M params | {info.world_size} proc(s) "
              f"| global batch {plan.global_batch} = {plan.micro_batch} x {plan.grad_accum} accum x "
              f"{info.world_size} (kappa {plan.kappa:g}) | {cfg.optim.name} {plan.hparams} | "
              f"steps {step}->{total_steps} | corpus {corpus.description}", flush=True)

    loader = GlobalBatchLoader(data.train, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                               rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                               samples_seen=samples)
    val = eval_batches(data.val, micro_batch=plan.micro_batch, rank=info.rank,
                       world_size=info.world_size, max_blocks=cfg.train.eval_blocks)
    logger = MetricsLogger(out, active=main_rank, tensorboard=cfg.logging.tensorboard)
    progress = Progress(cfg.logging.progress, total_steps, initial=step, enabled=main_rank)
    stop = StopFlag()
    scalar_hparams = {}  # the scaled constants beside lr, logged with every record
    for k, v in plan.hparams.items():
        if isinstance(v, (list, tuple)):
            scalar_hparams.update({f"beta{i + 1}" if k == "betas" else f"{k}_{i}": x for i, x in enumerate(v)})
        elif k != "lr" and isinstance(v, (int, float)):
            scalar_hparams[k] = v
    probe = None  # gradient noise scale: per-micro-batch grads (hooks) against the step's reduced grad
    if cfg.train.noise_scale_every:
        if plan.grad_accum * info.world_size < 2:
            raise ConfigError("train.noise_scale_every: measuring the noise scale needs >= 2 micro batches per "
                              "step (gradient accumulation or >= 2 processes); set it to 0 or change batch")
        from bigbatch.optim.noise_scale import GradientNoiseScale, NoiseScaleProbe

        probe = NoiseScaleProbe(engine.module.parameters(), plan.micro_batch, micro_grad_scale=plan.grad_accum,
                                estimator=GradientNoiseScale(warn_factor=cfg.train.noise_scale_warn_factor))
        if client is not None and client.get("noise_scale"):
            probe.estimator.load_state_dict(client["noise_scale"])  # the EMA continues across a resume

    def save(tag_step: int) -> None:
        state = {"step": tag_step, "samples": loader.samples_seen, "tokens": loader.samples_seen * data.seq_len,
                 "world_size": info.world_size, "global_batch": plan.global_batch,
                 "noise_scale": probe.estimator.state_dict() if probe is not None else None}
        bbengine.save_checkpoint(engine, ckpt_dir, tag=f"step{tag_step:08d}", client_state=state)

    def run_eval(at_step: int) -> dict:
        eval_loss = evaluate(engine, val, info.device)
        rec = {"kind": "eval", "step": at_step, "samples": loader.samples_seen,
               "tokens": loader.samples_seen * data.seq_len, "eval_loss": eval_loss,
               "eval_ppl": math.exp(min(eval_loss, 50.0))}
        logger.log(rec)
        progress.write(f"eval step {at_step}: loss {eval_loss:.4f} | ppl {rec['eval_ppl']:.2f}")
        return rec

    engine.train()
    window_loss, window_steps, window_start, paused = 0.0, 0, time.perf_counter(), 0.0
    last_eval = None
    exit_code = 0
    while step < total_steps:
        # lr from the tokens seen at the end of this step (so step 1 of a warmup is not lr 0)
        mult = schedule.factor((loader.samples_seen + plan.global_batch) * data.seq_len)
        for g, peak in zip(optimizer.param_groups, peak_lrs):
            g["lr"] = peak * mult
        measure = probe is not None and step % cfg.train.noise_scale_every == 0
        step_loss, gnorm = train_step(engine, loader.next_step(), info.device, probe=probe, measure=measure)
        step += 1
        if measure and math.isfinite(gnorm):
            probe.step_done(global_sq_norm=gnorm**2)
            probe.estimator.check_batch(plan.global_batch)  # warns past the critical batch
        window_loss += step_loss
        window_steps += 1

        record = None
        if step % cfg.train.log_every == 0 or step == total_steps:
            mean_loss = bbdist.all_reduce_sum([window_loss])[0] / (info.world_size * window_steps)
            elapsed = time.perf_counter() - window_start - paused  # eval/checkpoint time left out
            record = {"kind": "train", "step": step, "samples": loader.samples_seen,
                      "tokens": loader.samples_seen * data.seq_len, "loss": mean_loss,
                      "lr": optimizer.param_groups[0]["lr"], **scalar_hparams, "grad_norm": gnorm,
                      "tokens_per_s": window_steps * tokens_per_step / elapsed if elapsed > 0 else float("nan")}
            if probe is not None and probe.estimator.b_noise is not None:
                record["noise_scale"] = probe.estimator.b_noise  # samples (EMA, bias-corrected)
            logger.log(record)
            window_loss, window_steps, window_start, paused = 0.0, 0, time.perf_counter(), 0.0
        progress.update(step, record)

        pause_start = time.perf_counter()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            last_eval = run_eval(step)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
            save(step)
        if bbdist.any_rank(stop.signum is not None):
            save(step)
            if main_rank:
                progress.write(f"signal received: checkpoint saved at step {step} in {ckpt_dir}; exiting "
                               f"with code {cfg.checkpoint.preempt_exit_code} (resume with --resume {out})")
            exit_code = cfg.checkpoint.preempt_exit_code
            break
        paused += time.perf_counter() - pause_start

    if exit_code == 0:
        if last_eval is None or last_eval["step"] != step:
            last_eval = run_eval(step)
        if cfg.checkpoint.at_end:
            save(step)
    progress.close()
    logger.close()
    if main_rank and exit_code == 0:
        msg = f"final eval: loss {last_eval['eval_loss']:.4f} | perplexity {last_eval['eval_ppl']:.2f} | step {step}"
        if cfg.logging.plot:
            png = plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"),
                              title=f"{cfg.model.arch} {cfg.optim.name}, global batch {plan.global_batch}")
            msg += f"\nloss curves: {png}"
        print(msg + f"\nmetrics: {os.path.join(out, 'metrics.jsonl')}", flush=True)
    bbdist.barrier()
    return exit_code


def main(argv=None) -> int:
    try:
        args, overrides = parse_args(argv)
        cfg, out, resuming = resolve_run(args, overrides)
        return train(cfg, out, resuming, args.overwrite)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        bbdist.destroy()


if __name__ == "__main__":
    sys.exit(main())
