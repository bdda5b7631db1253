"""The training loop: steps, the learning-rate schedule in tokens, evaluation, logging, checkpoints
and preemption, over a :class:`~bigbatch.training.engine.DeepSpeedRun`.

:class:`Trainer` owns the run's position (steps, samples seen) and everything that follows from it:
the lr of every group (peak x schedule factor at the tokens seen), the logging window, and the
eval / checkpoint cadence. Its ``run()`` returns the process exit code.
"""

from __future__ import annotations

import math
import os
import signal
import time

from bigbatch import distributed as bbdist
from bigbatch.training.config import ConfigError, RunConfig, dump_yaml
from bigbatch.training.data import GlobalBatchLoader, eval_batches
from bigbatch.training.engine import RunSetup, lr_schedule
from bigbatch.training.metrics import MetricsLogger, Progress, plot_losses, truncate_metrics
from bigbatch.training.model import count_parameters


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


def hparam_fields(hparams: dict) -> dict:
    """The scaled constants beside lr, as flat record fields (``betas`` -> ``beta1``, ``beta2``)."""
    out = {}
    for k, v in hparams.items():
        if isinstance(v, (list, tuple)):
            out.update({f"beta{i + 1}" if k == "betas" else f"{k}_{i}": x for i, x in enumerate(v)})
        elif k != "lr" and isinstance(v, (int, float)):
            out[k] = v
    return out


class Trainer:
    """One run of ``cfg`` in ``out`` on the process group ``info`` (see the module docstring).

    Args:
        cfg: the run config.
        out: the run directory (metrics.jsonl, checkpoints/, ...).
        info: :class:`bigbatch.distributed.DistInfo` of this process.
        data: the packed blocks (:class:`~bigbatch.training.data.PackedData`); ``corpus``: its source.
        run: plan, model and engine from :func:`bigbatch.training.engine.setup`.
        resuming: continue from the latest good checkpoint in ``out/checkpoints`` if there is one.
    """

    def __init__(self, cfg: RunConfig, out: str, info, data, corpus, run: RunSetup, *, resuming: bool):
        self.cfg, self.out, self.info, self.data, self.corpus = cfg, out, info, data, corpus
        self.plan, self.model, self.engine = run.plan, run.model, run.engine
        self.ckpt_dir = os.path.join(out, "checkpoints")
        self.schedule = lr_schedule(cfg)  # in tokens: a batch change changes the step count only
        self.peak_lrs = [g["lr"] for g in self.engine.param_groups]  # the plan's; the schedule multiplies
        self.step = 0
        client = self.engine.load(self.ckpt_dir) if resuming else None
        samples = 0
        if client is not None:
            self.step, samples = int(client["step"]), int(client["samples"])
        elif resuming and info.is_main:  # a requeued job that never reached its first checkpoint
            print(f"--resume: no complete checkpoint in {self.ckpt_dir}; starting from step 0", flush=True)
        if client is not None and client.get("global_batch", self.plan.global_batch) != self.plan.global_batch:
            self.engine.set_batch(self.plan, client["global_batch"])
        self.loader = GlobalBatchLoader(data.train, micro_batch=self.plan.micro_batch, grad_accum=self.plan.grad_accum,
                                        rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                                        samples_seen=samples)
        self.val = eval_batches(data.val, micro_batch=self.plan.micro_batch, rank=info.rank,
                                world_size=info.world_size, max_blocks=cfg.train.eval_blocks)
        self.probe = self._noise_probe(client)
        self.stop = StopFlag()
        self.logger: MetricsLogger | None = None
        self.progress: Progress | None = None
        self.last_eval: dict | None = None

    # ------------------------------------------------------------------ position

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    @property
    def tokens(self) -> int:
        return self.loader.samples_seen * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.plan.global_batch * self.seq_len

    def total_steps(self) -> int:
        """The step at which the run ends: the token budget at the current batch, or max_steps."""
        left = max(0, self.cfg.train.tokens - self.tokens)
        total = self.step + math.ceil(left / self.tokens_per_step)
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    def done(self) -> bool:
        return self.step >= self.total_steps()

    # ------------------------------------------------------------------ parts of a step

    def _noise_probe(self, client):
        """Gradient noise scale: per-micro-batch gradients (hooks) against the step's reduced one."""
        every = self.cfg.train.noise_scale_every
        if not every:
            return None
        if self.plan.grad_accum * self.info.world_size < 2:
            raise ConfigError("train.noise_scale_every: measuring the noise scale needs >= 2 micro batches per "
                              "step (gradient accumulation or >= 2 processes); set it to 0 or change batch")
        from bigbatch.scaling.noise_scale import GradientNoiseScale, NoiseScaleProbe

        probe = NoiseScaleProbe(self.engine.module.parameters(), self.plan.micro_batch,
                                micro_grad_scale=self.plan.grad_accum,
                                estimator=GradientNoiseScale(warn_factor=self.cfg.train.noise_scale_warn_factor))
        if client is not None and client.get("noise_scale"):
            probe.estimator.load_state_dict(client["noise_scale"])  # the EMA continues across a resume
        return probe

    def set_lr(self) -> None:
        """lr of every group at the tokens seen by the end of this step (so step 1 of a warmup is
        not lr 0)."""
        mult = self.schedule.factor(self.tokens + self.tokens_per_step)
        for g, peak in zip(self.engine.param_groups, self.peak_lrs):
            g["lr"] = peak * mult

    def train_step(self) -> tuple[float, float]:
        measure = self.probe is not None and self.step % self.cfg.train.noise_scale_every == 0
        after = None
        if self.probe is not None:  # record this micro batch's gradient for the noise scale, or drop it
            after = self.probe.micro_step_done if measure else self.probe.hook.collect
        loss, gnorm = self.engine.train_step(self.loader.next_step(), self.info.device, after_backward=after)
        self.step += 1
        if measure and math.isfinite(gnorm):
            self.probe.step_done(global_sq_norm=gnorm**2)
            self.probe.estimator.check_batch(self.plan.global_batch)  # warns past the critical batch
        return loss, gnorm

    def evaluate(self) -> dict:
        """Mean cross-entropy (nats/token) over every rank's validation batches, logged."""
        total, count = self.engine.eval_sums(self.val, self.info.device)
        total, count = bbdist.all_reduce_floats([total, count])
        eval_loss = total / max(count, 1)
        rec = {"kind": "eval", "step": self.step, "samples": self.loader.samples_seen, "tokens": self.tokens,
               "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))}
        self.logger.log(rec)
        self.progress.write(f"eval step {self.step}: loss {eval_loss:.4f} | ppl {rec['eval_ppl']:.2f}")
        self.last_eval = rec
        return rec

    def save(self) -> None:
        state = {"step": self.step, "samples": self.loader.samples_seen, "tokens": self.tokens,
                 "world_size": self.info.world_size, "global_batch": self.plan.global_batch,
                 "noise_scale": self.probe.estimator.state_dict() if self.probe is not None else None}
        self.engine.save(self.ckpt_dir, tag=f"step{self.step:08d}", client_state=state)

    # ------------------------------------------------------------------ the run

    def _write_resolved(self) -> None:
        plan, info = self.plan, self.info
        resolved = {
            "world_size": info.world_size, "backend": info.backend,
            "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(plan).items()
                     if k not in ("hparams", "reference_hparams", "optimizer_class")},
            "scaled_hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.hparams.items()},
            "tokens_per_step": self.tokens_per_step, "total_steps": self.total_steps(),
            "parameters": count_parameters(self.model), "vocab_size": self.model.config.vocab_size,
            "corpus": self.corpus.description, "data_cache": self.data.path, "train_blocks": int(len(self.data.train)),
            "val_blocks": int(len(self.data.val)), "precision": self.engine.precision,
            "zero_stage": self.engine.zero_stage,
        }
        dump_yaml({**self.cfg.to_dict(), "resolved": resolved}, os.path.join(self.out, "config.resolved.yaml"))
        print(f"bigbatch: {count_parameters(self.model) / 1e6:.2f}M params | {info.world_size} proc(s) "
              f"| global batch {plan.global_batch} = {plan.micro_batch} x {plan.grad_accum} accum x "
              f"{info.world_size} (kappa {plan.kappa:g}) | {self.cfg.optim.name} {plan.hparams} | "
              f"steps {self.step}->{self.total_steps()} | corpus {self.corpus.description}", flush=True)

    def run(self) -> int:
        """Train to the token budget (or max_steps); returns 0, or the preemption exit code after a
        signal (a checkpoint is saved first)."""
        cfg, main = self.cfg, self.info.is_main
        if main:
            truncate_metrics(os.path.join(self.out, "metrics.jsonl"), self.step)
            self._write_resolved()
        self.logger = MetricsLogger(self.out, active=main, tensorboard=cfg.logging.tensorboard)
        self.progress = Progress(cfg.logging.progress, self.total_steps(), initial=self.step, enabled=main)
        fields = hparam_fields(self.plan.hparams)
        exit_code = 0
        window_loss, window_steps, window_start, paused = 0.0, 0, time.perf_counter(), 0.0
        while not self.done():
            self.set_lr()
            step_loss, gnorm = self.train_step()
            window_loss += step_loss
            window_steps += 1
            last = self.done()
            record = None
            if self.step % cfg.train.log_every == 0 or last:
                mean_loss = bbdist.all_reduce_floats([window_loss])[0] / (self.info.world_size * window_steps)
                elapsed = time.perf_counter() - window_start - paused  # eval/checkpoint time left out
                record = {"kind": "train", "step": self.step, "samples": self.loader.samples_seen,
                          "tokens": self.tokens, "loss": mean_loss, "lr": self.engine.param_groups[0]["lr"],
                          **fields, "grad_norm": gnorm,
                          "tokens_per_s": window_steps * self.tokens_per_step / elapsed if elapsed > 0 else float("nan")}
                if self.probe is not None and self.probe.estimator.b_noise is not None:
                    record["noise_scale"] = self.probe.estimator.b_noise  # samples (EMA, bias-corrected)
                self.logger.log(record)
                window_loss, window_steps, window_start, paused = 0.0, 0, time.perf_counter(), 0.0
            self.progress.update(self.step, record)

            pause_start = time.perf_counter()
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and not last:
                self.evaluate()
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and not last:
                self.save()
            if bbdist.any_rank(self.stop.signum is not None):
                self.save()
                if main:
                    self.progress.write(f"signal received: checkpoint saved at step {self.step} in {self.ckpt_dir}; "
                                        f"exiting with code {cfg.checkpoint.preempt_exit_code} "
                                        f"(resume with --resume {self.out})")
                exit_code = cfg.checkpoint.preempt_exit_code
                break
            paused += time.perf_counter() - pause_start

        if exit_code == 0:
            if self.last_eval is None or self.last_eval["step"] != self.step:
                self.evaluate()
            if cfg.checkpoint.at_end:
                self.save()
        self.progress.close()
        self.logger.close()
        if main and exit_code == 0:
            ev = self.last_eval
            msg = f"final eval: loss {ev['eval_loss']:.4f} | perplexity {ev['eval_ppl']:.2f} | step {self.step}"
            if cfg.logging.plot:
                png = plot_losses(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "loss.png"),
                                  title=f"{cfg.model.arch} {cfg.optim.name}, global batch {self.plan.global_batch}")
                msg += f"\nloss curves: {png}"
            print(msg + f"\nmetrics: {os.path.join(self.out, 'metrics.jsonl')}", flush=True)
        bbdist.barrier()
        return exit_code

