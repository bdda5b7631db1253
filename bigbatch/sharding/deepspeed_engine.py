"""DeepSpeed as a :class:`~bigbatch.sharding.training_engine.TrainingEngine`.

:func:`build_engine` runs ``deepspeed.initialize`` with a client optimizer that bigbatch builds from
its registry (AdaBound, AMSBound, RAdam, torch's optimizers, any class path) with the batch plan's
scaled hyperparameters; :class:`DeepSpeedEngine` is the training loop's view of the result: steps over
micro batches, the global gradient norm, a change of layout in place, resharding checkpoints."""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch

from bigbatch.distributed import init_distributed
from bigbatch.errors import ConfigError
from bigbatch.scaling.noise_scale import NoiseScaleProbe
from bigbatch.sharding import deepspeed_state as st
from bigbatch.sharding.deepspeed_checkpoint import load_checkpoint, save_checkpoint
from bigbatch.sharding.deepspeed_config import DSConfigError, load_ds_config, resolve_ds_config
from bigbatch.sharding.optimizer import optimizer_groups, param_groups, step_if_finite
from bigbatch.sharding.training_engine import StepOutput, TrainingEngine, mean_loss

logger = logging.getLogger(__name__)


def build_engine(model: torch.nn.Module, ds_config, *, plan=None, optimizer: str | type | None = None,
                 optimizer_kwargs: dict | None = None, param_groups=None, lr_scheduler: Callable | None = None):
    """``deepspeed.initialize`` with a client optimizer built by bigbatch.

    Args:
        model: the module (unpartitioned; ZeRO-3 partitions it here).
        ds_config: dict or JSON path; see :func:`bigbatch.sharding.deepspeed_config.resolve_ds_config`.
        plan: a ``BatchPlan``; batch fields, the optimizer and its kappa-scaled hyperparameters.
        optimizer, optimizer_kwargs: the optimizer when no plan names it; unscaled constructor
            kwargs (``foreach``, ``fused``) either way.
        param_groups: list of dicts (``params`` plus per-group overrides at the reference batch).
        lr_scheduler: callable ``optimizer -> scheduler`` (DeepSpeed steps it at each boundary).

    Returns:
        ``(engine, optimizer, lr_scheduler)`` as ``deepspeed.initialize`` returns them.
    """
    # refuse bad configs before DeepSpeed starts
    resolved = resolve_ds_config(ds_config, model=model, plan=plan, optimizer=optimizer,
                                 optimizer_kwargs=optimizer_kwargs)
    model_parameters = optimizer_groups(model, param_groups, resolved.optimizer_cls, plan, error=DSConfigError)
    import deepspeed  # heavy: imported when an engine is built, not with bigbatch.sharding

    init_distributed(use_deepspeed=True)  # no-op when a process group exists

    if torch.distributed.get_world_size() != resolved.world_size:
        raise DSConfigError(f"world size: the config was resolved for {resolved.world_size} processes ($WORLD_SIZE)"
                            f" but the process group has {torch.distributed.get_world_size()}")
    client_optimizer = None
    if resolved.optimizer_cls is not None:
        client_optimizer = resolved.optimizer_cls(model_parameters, **resolved.optimizer_kwargs)
        if plan is not None:
            logger.info("bigbatch: %s at global batch %d (kappa=%.6g vs reference %d): %s",
                        resolved.optimizer_cls.__name__, plan.global_batch, plan.kappa,
                        plan.reference_global_batch, resolved.optimizer_kwargs)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=client_optimizer,
        model_parameters=model_parameters if client_optimizer is None else None,
        lr_scheduler=lr_scheduler, config=resolved.ds_config)
    if not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()):
        skip_non_finite_steps(engine.optimizer)
    return engine, optimizer, scheduler


def skip_non_finite_steps(optimizer) -> None:
    """Make ``optimizer.step()`` a no-op when any gradient is NaN or inf, with ``optimizer.overflow``
    saying so, as DeepSpeed's ZeRO and bf16 optimizers already do: the engine then counts the step
    in ``skipped_steps`` and ``was_step_applied()`` is False; no state changes (weights, moments,
    step counters). For a DeepSpeed engine without ZeRO in fp32, where every rank holds the same
    reduced gradient, so all ranks decide alike (:func:`~bigbatch.sharding.optimizer.step_if_finite`)."""
    step = optimizer.step

    def guarded(closure=None):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            optimizer.overflow = False
            return step(closure) if closure is not None else step()
        applied = step_if_finite(optimizer, torch.nn.utils.get_total_norm(grads), step=step)
        optimizer.overflow = not applied if isinstance(applied, bool) else ~applied
        return None

    optimizer.overflow = False
    optimizer.step = guarded


def set_engine_batch(engine, micro_batch: int, grad_accum: int) -> None:
    """Change a live engine's micro batch and gradient accumulation (call between optimizer steps):
    its global batch becomes ``micro_batch * grad_accum * world_size`` and it steps at the new
    accumulation boundary. ZeRO-1/2 with optimizer offload keeps its own copy of the count."""
    engine.set_train_micro_batch_size(micro_batch)
    engine.set_train_batch_size(micro_batch * grad_accum * engine.dp_world_size)
    # DeepSpeed finds the boundary as (micro_steps + 1) % accumulation == 0: start the next window
    # on a multiple of the new accumulation (micro_steps counts nothing else)
    engine.micro_steps = -(-engine.micro_steps // grad_accum) * grad_accum
    if hasattr(engine.optimizer, "gradient_accumulation_steps"):
        engine.optimizer.gradient_accumulation_steps = grad_accum


def reports_grad_norm(engine) -> bool:
    """Whether ``engine.step()`` computes the global gradient norm (DeepSpeed 0.19: all ZeRO
    stages and precisions except fp32 at stage 0, whose plain step computes none)."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def step_with_grad_norm(engine) -> torch.Tensor:
    """``engine.step()`` at a gradient-accumulation boundary, returning the L2 norm of the step's
    reduced gradient (averaged over ranks and micro steps, before clipping) as a scalar tensor.

    This is the large-batch norm that :class:`bigbatch.scaling.NoiseScaleProbe` needs under DeepSpeed:
    ZeRO reduces (and partitions) the gradient inside ``step()``, so its norm exists only there
    (``engine.get_global_grad_norm()`` afterwards); a stage-0 fp32 engine computes none, but has
    already all-reduced the full ``.grad`` on every rank before its step. NaN if neither is there.
    """
    if not engine.is_gradient_accumulation_boundary():
        raise RuntimeError("step_with_grad_norm: call it on the last micro step of an optimizer step")
    norm = None
    if not reports_grad_norm(engine):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    engine.step()
    if norm is None:
        reported = engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if reported is None else reported)
    return norm


def precision_of(ds_config: dict) -> str:
    """"bf16", "fp16" or "fp32": the precision a DeepSpeed config dict asks for."""
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


class DeepSpeedEngine(TrainingEngine):
    """A DeepSpeed engine (``ds_engine``) built from ``ds_config`` by :func:`build_engine`."""

    name = "deepspeed"

    def __init__(self, ds_engine, ds_config: dict):
        self.ds_engine = ds_engine
        self.ds_config = ds_config
        self.precision = precision_of(ds_config)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def module(self) -> torch.nn.Module:
        return self.ds_engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """bigbatch's (client) optimizer, on this rank's partition under ZeRO."""
        return self.ds_engine.basic_optimizer

    def noise_measurable(self, plan) -> bool:
        """The noise scale needs >= 2 micro batches per step over all ranks."""
        return plan.grad_accum * plan.world_size >= 2

    def noise_probe(self, plan, estimator):
        """Per-micro-batch gradient norms (tensor hooks) against the step's reduced gradient."""
        return NoiseScaleProbe(self.module.parameters(), plan.micro_batch, micro_grad_scale=plan.grad_accum,
                               estimator=estimator)

    def train_step(self, micro_batches, device, after_backward=None, weights=None) -> StepOutput:
        """DeepSpeed averages over accumulation and ranks and steps at the last micro batch. Its ZeRO
        and bf16 optimizers and fp16 loss scaler skip a non-finite step (DeepSpeed reads their overflow
        flag itself), and :func:`skip_non_finite_steps` does for the rest."""
        losses, gnorm = [], None
        for i, x in enumerate(micro_batches):
            x = x.to(device)
            loss = self.ds_engine(input_ids=x, labels=x).loss
            self.ds_engine.backward(loss if weights is None else loss * weights[i])
            if after_backward is not None:
                after_backward()
            if i == len(micro_batches) - 1:
                gnorm = step_with_grad_norm(self.ds_engine)
            else:
                self.ds_engine.step()
            losses.append(loss)
        return StepOutput({"loss": mean_loss(losses), "grad_norm": gnorm}, self.ds_engine.was_step_applied())

    def state_bytes(self) -> int:
        """Per parameter the fp32 master and two or three moments, stored once (the low-precision
        weights are cast from the master on load)."""
        return 16 * sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())

    def save(self, ckpt_dir, *, tag, client_state, keep=None, background=False):
        """Synchronous (DeepSpeed's fragment gathers are collectives on the training's group)."""
        save_checkpoint(self.ds_engine, ckpt_dir, tag=tag, client_state=client_state, keep=keep)

    def load_newest(self, ckpt_dir, tag=None):
        """Any world size and ZeRO stage; the batch it was saved at is kept (the loop moves it)."""
        return load_checkpoint(self.ds_engine, ckpt_dir, tag=tag, fallback=tag is None)

    def set_layout(self, plan) -> None:
        """DeepSpeed's batch fields (between two optimizer steps): it then steps at the new
        accumulation boundary."""
        set_engine_batch(self.ds_engine, plan.micro_batch, plan.grad_accum)

    def rescale(self, kappa, rule):
        return st.rescale_engine(self.ds_engine, kappa, rule, log=False)  # the loop reports it

    def export_full_state(self) -> dict:
        return st.gather_full_state(self.ds_engine)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(cfg, plan) -> dict:
    """The DeepSpeed config dict: JSON file <- run-config fields <- ``deepspeed.extra``. The batch
    fields come from the plan; the optimizer is the run config's (built by bigbatch), so the JSON
    may only leave its ``"optimizer"`` block to it (``"type": "auto"``)."""
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


def build(cfg, model: torch.nn.Module, plan) -> DeepSpeedEngine:
    """The run config's DeepSpeed engine for ``model`` (``train.engine: deepspeed``): parameter groups
    without decay on vectors, bigbatch's optimizer from ``plan`` as DeepSpeed's client optimizer."""
    groups = param_groups(model, float(cfg.optim.hparams.get("weight_decay", 0.0)),
                          no_decay_norms_and_biases=cfg.optim.no_decay_norms_and_biases)
    ds = deepspeed_config(cfg, plan)
    try:
        engine, _, _ = build_engine(model, ds, plan=plan, optimizer_kwargs=cfg.optim.kwargs, param_groups=groups)
    except (ValueError, TypeError, KeyError) as exc:  # DSConfigError is a ValueError
        raise ConfigError(f"deepspeed: {exc}") from None
    return DeepSpeedEngine(engine, ds)
