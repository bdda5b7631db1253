"""Run config -> batch plan -> model -> engine: everything between the data and the training loop.

The plan (:func:`bigbatch.scaling.plan_batch`) turns the reference global batch and hyperparameters
of ``cfg.optim`` into this world size's micro batch, accumulation and scaled hyperparameters; the
engine (:func:`bigbatch.sharding.build_engine`) builds the optimizer from the plan and hands it to
DeepSpeed. :class:`DeepSpeedRun` is the loop's view of that engine: a training step over micro
batches, evaluation, checkpoints, and a change of the global batch in place.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from bigbatch.training.config import ConfigError, RunConfig
from bigbatch.training.model import build_model, padded_vocab, param_groups


def _tuples(hparams: dict) -> dict:
    # YAML gives lists; optimizers and the scaling rules expect betas as a tuple.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}


def needs_noise_scale(cfg: RunConfig) -> bool:
    """Whether the run must measure the gradient noise scale (asked for, or an automatic batch
    schedule), so that every step needs >= 2 micro batches."""
    return cfg.batch.schedule == "auto" or bool(cfg.train.noise_scale_every)


def make_plan(cfg: RunConfig, world_size: int, global_batch: int | None = None, *, where: str = "batch"):
    """The :class:`~bigbatch.scaling.BatchPlan` for this world size: ``global_batch`` if given (a batch
    schedule's), else the schedule's first batch, else ``cfg.batch``'s policy. Planner errors become
    ConfigErrors that start with ``where`` (they name the infeasible batch and the nearest feasible
    ones)."""
    from bigbatch.scaling.planner import plan_batch

    b = cfg.batch
    schedule = b.batch_schedule()
    if global_batch is None and schedule is not None:
        global_batch = schedule.start
    policy = "fixed" if global_batch is not None else b.policy
    try:
        return plan_batch(world_size, list(b.micro_batch_sizes),
                          reference_global_batch=b.reference_global_batch,
                          optimizer=cfg.optim.name, hparams=_tuples(cfg.optim.hparams),
                          policy=policy, global_batch=global_batch if global_batch is not None else b.global_batch,
                          per_device_batch=None if policy == "fixed" else b.per_device_batch,
                          beta_form=b.beta_form, min_micro_batches=2 if needs_noise_scale(cfg) else 1)
    except (ValueError, TypeError) as exc:
        hint = ""
        if needs_noise_scale(cfg) and "micro batches per step" in str(exc):
            hint = (" (the gradient noise scale, which train.noise_scale_every or batch.schedule: auto needs, "
                    "compares micro batches with their step)")
        raise ConfigError(f"{where}: {exc}{hint}") from None


def check_batch(cfg: RunConfig, world_size: int) -> None:
    """The run's batch, and every batch its schedule can put in force, must be reachable on this world
    size (with valid scaled betas): refused before any work, naming the schedule entry."""
    schedule = cfg.batch.batch_schedule()
    if schedule is None:
        make_plan(cfg, world_size)
        return
    if cfg.batch.schedule == "auto":
        for batch in schedule.batches():
            make_plan(cfg, world_size, batch, where=f"batch.schedule: auto grows to {batch} (min_global_batch "
                                                    f"{schedule.start} x growth_factor {schedule.factor}^k)")
    else:
        for i, (tokens, batch) in enumerate(schedule.entries):
            make_plan(cfg, world_size, batch, where=f"batch.schedule[{i}]: [{tokens}, {batch}]")


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(cfg: RunConfig, plan) -> dict:
    """The DeepSpeed config dict: JSON file <- run-config fields <- ``deepspeed.extra``. The batch
    fields come from the plan; the optimizer is the run config's (built by bigbatch), so the JSON
    may only leave its ``"optimizer"`` block to it (``"type": "auto"``)."""
    from bigbatch.sharding.config import DSConfigError, load_ds_config

    ds: dict = {}
    if cfg.deepspeed.config:
        try:
            ds = load_ds_config(cfg.deepspeed.config)
        except DSConfigError as exc:
            raise ConfigError(f"deepspeed.config: {exc}") from None
    ds = _merge(ds, cfg.deepspeed.extra)
    zero = ds.setdefault("zero_optimization", {})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", 0)
    precision = cfg.deepspeed.precision
    if precision is not None:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["train_batch_size"] = plan.global_batch
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds.setdefault("steps_per_print", 10**9)  # our logger reports; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def precision_of(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def lr_schedule(cfg: RunConfig):
    """The run's :class:`~bigbatch.scaling.SampleSchedule` in tokens over ``train.tokens``."""
    from bigbatch.scaling.schedules import SampleSchedule

    s = cfg.schedule
    decay_length = 0
    if s.kind == "wsd":
        decay_length = s.decay_tokens if s.decay_tokens is not None else int(0.2 * cfg.train.tokens)
    try:
        return SampleSchedule(warmup=s.warmup_tokens, total=cfg.train.tokens, decay=s.kind,
                              min_ratio=s.min_lr_ratio, decay_length=decay_length, unit="tokens")
    except ValueError as exc:
        raise ConfigError(f"schedule (with train.tokens={cfg.train.tokens}): {exc}") from None


@torch.no_grad()
def eval_sums(model, batches: list[torch.Tensor], device) -> tuple[float, int]:
    """(summed cross-entropy in nats, predicted positions) of ``model`` over this rank's batches."""
    model.eval()
    total, count = 0.0, 0
    for x in batches:
        x = x.to(device)
        loss = model(input_ids=x, labels=x).loss
        n = x.numel() - x.shape[0]  # predicted positions
        total += float(loss) * n
        count += n
    model.train()
    return total, count


def resume(ckpt_dir: str, if_unusable: str, load) -> tuple[dict | None, str | None]:
    """``(client state, note)`` of the newest good checkpoint (``load()``, collective); the client state
    is None to start from step 0: no complete checkpoint (a requeue before the first save), or none
    usable with ``if_unusable="restart"``; otherwise none usable is a ConfigError listing every tag and
    why it was refused."""
    from bigbatch.sharding import NoUsableCheckpoint, tags

    found = tags.scan(ckpt_dir)
    if not any(t.complete for t in found):
        partial = [t.tag for t in found]
        return None, f"incomplete checkpoints passed over: {partial}" if partial else None
    try:
        return load(), None
    except NoUsableCheckpoint as exc:
        if if_unusable == "restart":
            return None, f"{exc}\nstarting from step 0 anyway (checkpoint.if_unusable: restart)"
        raise ConfigError(f"--resume: {exc}\nto start from step 0 anyway, pass --checkpoint.if_unusable restart") \
            from None


class DeepSpeedRun:
    """The training loop's view of a DeepSpeed engine (``engine``) built from ``ds_config``."""

    name = "deepspeed"

    def __init__(self, engine, ds_config: dict):
        self.engine = engine
        self.ds_config = ds_config

    def noise_measurable(self, plan) -> bool:
        """The noise scale needs >= 2 micro batches per step over all ranks."""
        return plan.grad_accum * plan.world_size >= 2

    def noise_probe(self, plan, estimator):
        """Per-micro-batch gradient norms (tensor hooks) against the step's reduced gradient."""
        from bigbatch.scaling.noise_scale import NoiseScaleProbe

        return NoiseScaleProbe(self.engine.module.parameters(), plan.micro_batch, micro_grad_scale=plan.grad_accum,
                               estimator=estimator)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """bigbatch's (client) optimizer, on this rank's partition under ZeRO."""
        return self.engine.basic_optimizer

    @property
    def param_groups(self) -> list[dict]:
        """The client optimizer's groups: the loop sets their ``lr`` every step."""
        return self.optimizer.param_groups

    @property
    def precision(self) -> str:
        return precision_of(self.ds_config)

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def train_step(self, micro_batches: list[torch.Tensor], device, after_backward=None,
                   poison: bool = False, weights: list[float] | None = None) -> tuple[float, float]:
        """One optimizer step over this rank's micro batches (LongTensors (micro, seq_len));
        DeepSpeed averages over accumulation and ranks and steps at the last one.
        ``after_backward()`` runs after each backward pass (the noise-scale probe). ``poison``
        multiplies the loss by NaN (fault injection for tests). ``weights``: a multiplier per micro
        batch of the loss that is differentiated (the reported loss is not weighted). Returns (mean
        loss on this rank, global gradient norm before clipping). A step whose gradient is not finite
        changes nothing (:meth:`step_applied` is then False)."""
        from bigbatch.sharding import step_with_grad_norm

        total, gnorm = 0.0, float("nan")
        for i, x in enumerate(micro_batches):
            x = x.to(device)
            loss = self.engine(input_ids=x, labels=x).loss
            if poison:
                loss = loss * float("nan")
            self.engine.backward(loss if weights is None else loss * weights[i])
            if after_backward is not None:
                after_backward()
            if i == len(micro_batches) - 1:
                gnorm = step_with_grad_norm(self.engine)
            else:
                self.engine.step()
            total += float(loss.detach())
        return total / len(micro_batches), gnorm

    def step_applied(self) -> bool:
        """Whether the last optimizer step changed the weights (False: skipped, its gradient was not
        finite; DeepSpeed's ZeRO and bf16 optimizers and fp16 loss scaler skip such steps, and
        :func:`bigbatch.sharding.engine.skip_non_finite_steps` does for the rest)."""
        return bool(self.engine.was_step_applied())

    def state_bytes(self) -> int:
        """About what a checkpoint of this engine takes on disk: per parameter the weights, fp32
        master and optimizer states in DeepSpeed's files and again in the resharding parts."""
        return 32 * sum(p.numel() for p in self.engine.module.parameters())

    def eval_sums(self, batches: list[torch.Tensor], device) -> tuple[float, int]:
        return eval_sums(self.engine, batches, device)

    def save(self, ckpt_dir: str, *, tag: str, client_state: dict, keep: int | None = None) -> None:
        """Collective all-or-nothing save (bigbatch.sharding): 'latest' moves only when every rank is
        done; CheckpointSaveError on every rank when any failed."""
        from bigbatch.sharding import save_checkpoint

        save_checkpoint(self.engine, ckpt_dir, tag=tag, client_state=client_state, keep=keep)

    def load(self, ckpt_dir: str, *, if_unusable: str = "fail") -> tuple[dict | None, str | None]:
        """Restore the newest good checkpoint on any world size: ``(client state, note)``; the
        client state is None to start from step 0: no complete checkpoint (a requeue before the first
        save), or none usable with ``if_unusable="restart"``; otherwise none usable is a ConfigError
        listing every tag and why it was refused. The batch it was saved at is kept: the loop moves
        it to another one."""
        from bigbatch.sharding import load_checkpoint

        return resume(ckpt_dir, if_unusable, lambda: load_checkpoint(self.engine, ckpt_dir, fallback=True))

    def set_layout(self, plan) -> None:
        """DeepSpeed's batch fields from ``plan`` (between two optimizer steps): the engine then steps
        at the new accumulation boundary."""
        from bigbatch.sharding import set_engine_batch

        set_engine_batch(self.engine, plan.micro_batch, plan.grad_accum)

    def rescale(self, plan, from_global_batch: int) -> dict:
        """Every group's hyperparameters by the scaling rule for kappa = ``plan.global_batch`` /
        ``from_global_batch``, and the step counters by samples
        (:func:`bigbatch.sharding.rescale_engine`). Returns its report."""
        from bigbatch.sharding import rescale_engine

        return rescale_engine(self.engine, plan.global_batch / from_global_batch, optimizer=plan.optimizer,
                              beta_form=plan.beta_form, log=False)  # the loop reports it


class FSDP2Run:
    """The training loop's view of a ``fully_shard`` model and bigbatch's optimizer on its DTensor
    shards (:mod:`bigbatch.sharding.fsdp2`): the same interface as :class:`DeepSpeedRun`."""

    name = "fsdp2"
    zero_stage = None

    def __init__(self, model, optimizer, *, precision: str, grad_clip: float):
        from bigbatch.sharding.fsdp2 import install_normed_reduce_scatter

        self.model, self.optimizer = model, optimizer
        self.precision = precision
        self.grad_clip = grad_clip
        self._applied = True
        self.comm = install_normed_reduce_scatter(model)

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def noise_measurable(self, plan) -> bool:
        """Each rank's local batch against the global one: needs >= 2 ranks."""
        return plan.world_size >= 2 and self.comm is not None

    def noise_probe(self, plan, estimator):
        from bigbatch.sharding.fsdp2 import FSDPNoiseProbe

        return FSDPNoiseProbe(self.comm, plan.micro_batch, plan.grad_accum, estimator)

    def train_step(self, micro_batches: list[torch.Tensor], device, after_backward=None,
                   poison: bool = False, weights: list[float] | None = None) -> tuple[float, float]:
        """One optimizer step: gradients of the micro batches accumulate unreduced (no sync) and are
        reduce-scattered with the last; the loss is scaled by 1 / (micro batches x ranks) (and by
        ``weights[i]``, as :meth:`DeepSpeedRun.train_step`) and FSDP sums, so the shards hold the
        global mean gradient. Clipping on the DTensor gradients; a non-finite global norm skips the
        step on every rank (they all see the same norm)."""
        from bigbatch.distributed import world_size

        n = len(micro_batches)
        scale = 1.0 / (n * world_size())
        total = 0.0
        for i, x in enumerate(micro_batches):
            self.model.set_requires_gradient_sync(i == n - 1)
            x = x.to(device)
            loss = self.model(input_ids=x, labels=x).loss
            if poison:
                loss = loss * float("nan")
            (loss * (scale if weights is None else scale * weights[i])).backward()
            if after_backward is not None:
                after_backward()
            total += float(loss.detach())
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        gnorm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self._applied = math.isfinite(gnorm)
        if self._applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / n, gnorm

    def step_applied(self) -> bool:
        return self._applied

    def state_bytes(self) -> int:
        """About what a checkpoint takes on disk: float32 weights and two or three moments."""
        return 16 * sum(p.numel() for p in self.model.parameters())

    def eval_sums(self, batches: list[torch.Tensor], device) -> tuple[float, int]:
        return eval_sums(self.model, batches, device)

    def save(self, ckpt_dir: str, *, tag: str, client_state: dict, keep: int | None = None) -> None:
        from bigbatch.optim.registry import canonical_name
        from bigbatch.sharding.fsdp2 import save_checkpoint

        meta = {"global_batch": client_state.get("global_batch"), "optimizer": canonical_name(type(self.optimizer))}
        save_checkpoint(self.model, self.optimizer, ckpt_dir, tag=tag, client_state=client_state, meta=meta, keep=keep)

    def load(self, ckpt_dir: str, *, if_unusable: str = "fail") -> tuple[dict | None, str | None]:
        """As :meth:`DeepSpeedRun.load`, through DCP (any world size)."""
        from bigbatch.sharding.fsdp2 import load_checkpoint

        return resume(ckpt_dir, if_unusable,
                      lambda: load_checkpoint(self.model, self.optimizer, ckpt_dir, fallback=True)["client_state"])

    def set_layout(self, plan) -> None:
        pass  # the loop feeds plan.grad_accum micro batches; FSDP2 has no batch configuration

    def rescale(self, plan, from_global_batch: int) -> dict:
        """:func:`bigbatch.scaling.rescale.rescale_optimizer` for kappa = new / old batch."""
        from bigbatch.scaling.rescale import rescale_optimizer

        return rescale_optimizer(self.optimizer, plan.global_batch / from_global_batch, family=plan.optimizer,
                                 beta_form=plan.beta_form)


@dataclass
class RunSetup:
    plan: object  # BatchPlan
    model: torch.nn.Module
    engine: DeepSpeedRun | FSDP2Run


def setup(cfg: RunConfig, world_size: int, tokenizer, seq_len: int, *, global_batch: int | None = None,
          init_weights: bool = True) -> RunSetup:
    """Plan -> model (seeded, identical on every rank) -> parameter groups (no decay on vectors,
    overrides at the reference batch) -> DeepSpeed engine with the optimizer built from the plan."""
    from bigbatch.sharding import build_engine

    check_batch(cfg, world_size)
    plan = make_plan(cfg, world_size, global_batch)
    model = build_model(cfg.model, padded_vocab(cfg.model, len(tokenizer)), seq_len, seed=cfg.train.seed,
                        eos_token_id=tokenizer.eos_token_id, init_weights=init_weights)
    if cfg.train.engine == "fsdp2":
        return RunSetup(plan, model, _fsdp2(cfg, model, plan))
    groups = param_groups(model, float(cfg.optim.hparams.get("weight_decay", 0.0)),
                          no_decay_norms_and_biases=cfg.optim.no_decay_norms_and_biases)
    ds = deepspeed_config(cfg, plan)
    try:
        engine, _, _ = build_engine(model, ds, plan=plan, optimizer_kwargs=cfg.optim.kwargs, param_groups=groups)
    except (ValueError, TypeError, KeyError) as exc:  # DSConfigError is a ValueError
        raise ConfigError(f"deepspeed: {exc}") from None
    return RunSetup(plan, model, DeepSpeedRun(engine, ds))


def _fsdp2(cfg: RunConfig, model, plan) -> FSDP2Run:
    """``fully_shard`` the model (blocks and root), then the plan's optimizer on its shards."""
    from bigbatch.distributed import default_backend
    from bigbatch.sharding.fsdp2 import shard_model
    from bigbatch.sharding.optimizer import build_optimizer

    f = cfg.fsdp2
    device_type = "cuda" if default_backend() == "nccl" else "cpu"
    if device_type == "cuda":
        model.to(torch.device("cuda", torch.cuda.current_device()))
    if f.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_model(model, device_type=device_type, precision=f.precision, reshard_after_forward=f.reshard_after_forward)
    groups = param_groups(model, float(cfg.optim.hparams.get("weight_decay", 0.0)),
                          no_decay_norms_and_biases=cfg.optim.no_decay_norms_and_biases)
    try:
        optimizer = build_optimizer(model, plan=plan, optimizer_kwargs=cfg.optim.kwargs, param_groups=groups)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"optim: {exc}") from None
    return FSDP2Run(model, optimizer, precision=f.precision, grad_clip=cfg.optim.grad_clip)
