"""The run configuration: :class:`RunConfig`, one dataclass per YAML section (the data and tokenizer
sections live in :mod:`bigbatch.data.config`), loaded from a file and ``--section.key value`` overrides by
:mod:`bigbatch.config_loader`. Unknown keys are errors that name the key and list the valid ones.
Free-form mappings (``optim.hparams``, ``optim.kwargs``, ``deepspeed.extra``) accept any key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from bigbatch import exit_codes
from bigbatch.config_loader import apply_key, dump_yaml, parse_overrides  # noqa: F401 (the run config's API)
from bigbatch.data.config import DataConfig, TokenizerConfig
from bigbatch.errors import ConfigError, check_choice as _choice, check_positive as _positive
from bigbatch.optim.registry import check_kwargs, get_optimizer_class
from bigbatch.scaling.batch_schedule import AutoBatchSchedule, BatchScheduleError, FixedBatchSchedule
from bigbatch.sharding.engines import ENGINES
from bigbatch.training.init_from import apply_init_from
from bigbatch.scaling.rules import BETA_FORMS, BOUND_FORMS, LINEAR_RULE, SECOND_MOMENTS, resolve_family, rule_for


@dataclass
class ModelConfig:
    """A causal LM built from a config (never downloaded), or ``init_from`` a Hugging Face model
    directory (or a hub name, with a network): its weights, architecture and tokenizer; the keys set
    here must then agree with it. Sizes in elements."""

    arch: str = "llama"  # llama | gpt2
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # llama grouped-query attention; None = num_heads
    intermediate_size: int | None = None  # None: llama 8/3*d rounded to 64, gpt2 4*d
    max_position_embeddings: int | None = None  # None: data.seq_len
    vocab_size: int | None = None  # None: the tokenizer's, padded to pad_vocab_to
    pad_vocab_to: int = 64  # round the embedding up so matmuls tile well
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attn_implementation: str = "sdpa"  # sdpa | eager
    init_from: str | None = None  # an HF causal LM: directory or hub name (bigbatch.training.init_from)
    # not a config key: the run's own saved model config, set on a saved run's config so that its
    # architecture never needs init_from (bigbatch.training.init_from.use_run_files)
    arch_from = None

    def validate(self) -> None:
        _choice("model", "arch", self.arch, ("llama", "gpt2"))
        _choice("model", "attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "max_position_embeddings", "vocab_size", "pad_vocab_to"):
            _positive("model", key, getattr(self, key))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size: {self.hidden_size} is not divisible by "
                              f"model.num_heads={self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads: {self.num_kv_heads} must divide "
                              f"model.num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: {self.dropout!r} must be in [0, 1)")


@dataclass
class OptimConfig:
    """The optimizer and its hyperparameters *at the reference global batch* (the batch planner
    rescales them for the actual one). ``hparams`` are constructor kwargs."""

    name: str = "adabound"  # registry short name or dotted class path
    hparams: dict = field(default_factory=dict)
    # Constructor kwargs that are not hyperparameters, passed unscaled (fused, foreach, ...).
    kwargs: dict = field(default_factory=dict)
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    no_decay_norms_and_biases: bool = True  # weight decay on matrices only

    def validate(self) -> None:

        try:
            cls = get_optimizer_class(self.name)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"optim.name: {exc}") from None
        for section in ("hparams", "kwargs"):
            try:
                check_kwargs(cls, getattr(self, section), f"optim.{section}")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        _positive("optim", "grad_clip", self.grad_clip, allow_zero=True)
        if "lr" not in self.hparams:
            raise ConfigError("optim.hparams.lr: required (the learning rate at the reference batch)")

    def check_constructs(self) -> None:
        """The optimizer must accept its hyperparameters: built once on a one-element parameter
        (microseconds), its refusal becomes a ConfigError naming ``optim.<section>.<key>`` (found by
        building it with that key alone, lr first) rather than an engine's error after start-up."""
        import torch

        cls = get_optimizer_class(self.name)

        def build(**kw):
            cls([torch.nn.Parameter(torch.zeros(1))], **kw)

        try:
            build(**self.hparams, **self.kwargs)
            return
        except (ValueError, TypeError, RuntimeError) as exc:
            whole = exc
        base = {"lr": self.hparams["lr"]}
        items = [("hparams", "lr", self.hparams["lr"])]
        items += [("hparams", k, v) for k, v in self.hparams.items() if k != "lr"]
        items += [("kwargs", k, v) for k, v in self.kwargs.items()]
        for section, key, value in items:
            try:
                build(**{**base, key: value})
            except (ValueError, TypeError, RuntimeError) as exc:
                raise ConfigError(f"optim.{section}.{key}: {value!r} is refused by {cls.__name__}: {exc}") from None
        raise ConfigError(f"optim.hparams: {self.hparams!r} with optim.kwargs {self.kwargs!r} are refused together "
                          f"by {cls.__name__}: {whole}")


@dataclass
class BatchConfig:
    """Global batch in sequences. ``policy: fixed`` keeps ``global_batch`` (default: the
    reference) at any world size; ``scale`` uses ``per_device_batch`` x world size and rescales
    hyperparameters by kappa = global / reference.

    ``schedule`` changes the global batch during the run, applying the scaling rules at every change:
    a list of ``[tokens, global_batch]`` pairs (piecewise constant from each token count on, the first
    at 0), or ``auto``: from ``min_global_batch`` (default: ``global_batch`` or the reference) grow by
    ``growth_factor`` up to ``max_global_batch`` whenever the measured noise scale is at least
    ``growth_margin`` x the next batch for ``growth_patience`` consecutive measurements, at least
    ``growth_min_tokens`` after the previous change or the start (default: the lr warmup)
    (bigbatch.scaling.batch_schedule)."""

    reference_global_batch: int = 32
    policy: str = "fixed"  # fixed | scale
    global_batch: int | None = None
    per_device_batch: int | None = None
    micro_batch_sizes: list[int] = field(default_factory=lambda: [8])  # what fits per device
    # how the betas move with the batch: paper (1 - k (1 - beta), the SDE rule), power (beta ** k),
    # keep_beta1 (beta1 kept, beta2 by the paper rule) or keep (every beta kept); lr x sqrt(k) in all
    beta_form: str = "paper"
    # AdaBound's final_lr: sqrt (x sqrt(k), the bounds follow Adam's lr) or linear (x k, SGD's rule)
    bound_form: str = "sqrt"
    # Adam's second moment at a change of batch: rescale (squared mean kept, the rest divided by k: the
    # noise variance at the new batch), divide (all of it / k) or keep (it relaxes over 1 / (1 - beta2)
    # steps, and steps stay small until then)
    second_moment: str = "rescale"
    # the lr at a batch other than the reference x sqrt((1 + B / B_noise) / (1 + B_ref / B_noise)) on top of
    # the square-root rule, from the measured noise scale (bigbatch.scaling.rules.noise_lr_factor): Adam's
    # steps shrink by that much more than the rule assumes near the critical batch. AdaBound's bounds do not
    # take the factor (a clipped step is SGD's). None: on with schedule auto for every optimizer of the
    # square-root and AdaBound rules, off for SGD (measured in docs/science.md, section 4)
    noise_lr: bool | None = None
    schedule: list[list[int]] | str | None = None  # [[tokens, global_batch], ...] | auto | None
    min_global_batch: int | None = None  # auto: the first batch
    max_global_batch: int | None = None  # auto: required
    growth_factor: int = 2  # auto
    # auto: grow when B_noise >= margin x the next batch; 0.75 measured on the tiny model (docs/science.md,
    # section 4): with the second moment rescaled at a change, 0.65 grew RAdam right after the warmup
    growth_margin: float = 0.75
    # auto: consecutive measurements that must agree; 20 and 30 moved the 3M-token gaps by less than the seed
    # does and took 2-5 points off the steps saved at 800k (docs/science.md, section 4)
    growth_patience: int = 10
    # auto: tokens before the first growth and between two; None: the lr warmup (schedule.warmup_tokens),
    # whose first steps measure the noise scale of a model still at its initialisation (large, misleading)
    growth_min_tokens: int | None = None
    # auto: steps between the sync points at which measurements are judged (each one in order) and the lr
    # follows the noise scale; a growth takes effect up to decide_every - 1 steps after the measurement
    # that called for it. 1 (every step, one read and one all-gather a step) is the measured behaviour;
    # on a GPU, 10 keeps the step free of reads
    decide_every: int = 1

    def batch_schedule(self):
        """The :mod:`bigbatch.scaling.batch_schedule` object of ``schedule`` (None without one)."""

        try:
            if self.schedule is None:
                return None
            if self.schedule == "auto":
                start = self.min_global_batch or self.global_batch or self.reference_global_batch
                return AutoBatchSchedule(start, self.max_global_batch, self.growth_factor, self.growth_margin,
                                         self.growth_patience, self.growth_min_tokens or 0)
            return FixedBatchSchedule([list(e) for e in self.schedule], unit="tokens")
        except BatchScheduleError as exc:
            raise ConfigError(f"batch.{exc}") from None

    def scaling_rule(self, optimizer: str | type):
        """The :class:`~bigbatch.scaling.rules.ScalingRule` of ``optimizer`` with this section's forms."""
        return rule_for(optimizer, beta_form=self.beta_form, bound_form=self.bound_form,
                        second_moment=self.second_moment)

    def noise_lr_on(self, optimizer: str | type) -> bool:
        """Whether the lr of ``optimizer`` follows the measured noise scale: ``noise_lr``, or by default with
        ``schedule: auto`` for the square-root and AdaBound rules' families (not SGD's linear rule)."""
        if self.noise_lr is not None:
            return bool(self.noise_lr)
        try:
            family = resolve_family(optimizer)[1]
        except ValueError:  # no scaling rule: nothing to correct
            return False
        return self.schedule == "auto" and family not in LINEAR_RULE

    def validate(self) -> None:
        _choice("batch", "policy", self.policy, ("fixed", "scale"))
        _choice("batch", "beta_form", self.beta_form, BETA_FORMS)
        _choice("batch", "bound_form", self.bound_form, BOUND_FORMS)
        _choice("batch", "second_moment", self.second_moment, SECOND_MOMENTS)
        _positive("batch", "reference_global_batch", self.reference_global_batch)
        _positive("batch", "decide_every", self.decide_every)
        _positive("batch", "global_batch", self.global_batch)
        _positive("batch", "per_device_batch", self.per_device_batch)
        if not self.micro_batch_sizes or any(m <= 0 for m in self.micro_batch_sizes):
            raise ConfigError(f"batch.micro_batch_sizes: {self.micro_batch_sizes!r} must be a "
                              "non-empty list of positive integers")
        if self.policy == "scale" and self.per_device_batch is None:
            raise ConfigError("batch.per_device_batch: required when batch.policy is 'scale'")
        if isinstance(self.schedule, str) and self.schedule != "auto":
            raise ConfigError(f"batch.schedule: {self.schedule!r} is not allowed; give 'auto' or a list of "
                              "[tokens, global_batch] pairs such as [[0, 16], [200000, 32]]")
        if self.schedule is not None:
            if self.policy != "fixed":
                raise ConfigError(f"batch.schedule: sets the global batch itself; batch.policy must be 'fixed', "
                                  f"not {self.policy!r}")
            if self.schedule == "auto" and self.max_global_batch is None:
                raise ConfigError("batch.max_global_batch: required when batch.schedule is 'auto' (the largest "
                                  "batch it may grow to)")
            self.batch_schedule()


@dataclass
class ScheduleConfig:
    """Learning-rate schedule in tokens, so a change of batch size changes only the step count.
    ``kind``: constant | cosine | linear | wsd (warmup-stable-decay)."""

    kind: str = "cosine"
    warmup_tokens: int = 0
    decay_tokens: int | None = None  # wsd: length of the final decay; None = 20% of train.tokens
    min_lr_ratio: float = 0.1  # final lr / peak lr

    def validate(self) -> None:
        _choice("schedule", "kind", self.kind, ("constant", "cosine", "linear", "wsd"))
        _positive("schedule", "warmup_tokens", self.warmup_tokens, allow_zero=True)
        _positive("schedule", "decay_tokens", self.decay_tokens)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio: {self.min_lr_ratio!r} must be in [0, 1]")


@dataclass
class TrainConfig:
    """Loop length and cadence. ``tokens`` is the budget; ``max_steps`` caps it (tests)."""

    tokens: int = 1_000_000
    max_steps: int | None = None
    seed: int = 1234
    log_every: int = 10  # steps
    eval_every: int = 100  # steps; 0 = only at the end
    eval_blocks: int = 64  # validation blocks per evaluation (the same ones at any world size)
    # steps between gradient-noise-scale measurements; None: every step when the step has >= 2 micro
    # batches (processes x accumulation), the case where it costs only a norm per micro batch; 0: off
    noise_scale_every: int | None = None
    noise_scale_warn_factor: float = 2.0  # warn when global batch > factor x B_noise
    # EMA coefficient per measurement of |G|^2 and tr(Sigma), about 1 / (1 - ema) measurements of memory.
    # Shorter memory lags less but biases B_noise upwards (a ratio of noisy estimates): on the tiny
    # config 0.95 gave 2x larger values than 0.99 late in a run.
    noise_scale_ema: float = 0.99
    threads: int | None = None  # torch intra-op threads per process; None = cores / local procs
    engine: str = "deepspeed"  # deepspeed | fsdp2 | ddp (bigbatch.sharding.engines; settings in their sections)
    # Hangs: a collective waits at most collective_timeout_s for the other ranks, and a watchdog ends
    # a rank that makes no progress (a step, an evaluation, a save) for step_timeout_s (0: off).
    collective_timeout_s: float = 300.0
    step_timeout_s: float = 1800.0
    # Non-finite gradients: the step is skipped on every rank (no state changes) and counted; this
    # many skipped in a row stop the run.
    max_skipped_steps: int = 10
    # A warning and a grad_spike record when a step's gradient norm exceeds this factor x its moving
    # average (0: off); large-batch runs often announce divergence this way.
    grad_spike_factor: float = 0.0
    eval_at_start: bool = False  # evaluate before the first step (e.g. a model.init_from's starting loss)
    # dense peak TFLOP/s of one device for the mfu field; None: from the GPU's name (bigbatch.training.flops)
    peak_tflops: float | None = None
    # torch.compile each Transformer block (Inductor: C++ on CPU, Triton on CUDA); the first steps compile
    compile: bool = False
    # [a, b]: a torch profiler trace of steps a..b (inclusive, from 1) per rank in OUT/profile/rank{R}.json
    profile_steps: list[int] | None = None

    def validate(self) -> None:
        _positive("train", "tokens", self.tokens)
        _positive("train", "max_steps", self.max_steps)
        _positive("train", "log_every", self.log_every)
        _positive("train", "eval_every", self.eval_every, allow_zero=True)
        _positive("train", "eval_blocks", self.eval_blocks)
        _positive("train", "noise_scale_every", self.noise_scale_every, allow_zero=True)
        _positive("train", "noise_scale_warn_factor", self.noise_scale_warn_factor)
        if not 0.0 <= self.noise_scale_ema < 1.0:
            raise ConfigError(f"train.noise_scale_ema: {self.noise_scale_ema!r} must be in [0, 1)")
        _positive("train", "threads", self.threads)
        _choice("train", "engine", self.engine, tuple(ENGINES))
        _positive("train", "collective_timeout_s", self.collective_timeout_s)
        _positive("train", "step_timeout_s", self.step_timeout_s, allow_zero=True)
        _positive("train", "max_skipped_steps", self.max_skipped_steps)
        _positive("train", "peak_tflops", self.peak_tflops)
        if self.grad_spike_factor and self.grad_spike_factor <= 1:
            raise ConfigError(f"train.grad_spike_factor: {self.grad_spike_factor!r} must be 0 (off) or > 1")
        p = self.profile_steps
        if p is not None and (len(p) != 2 or not 1 <= p[0] <= p[1]):
            raise ConfigError(f"train.profile_steps: {p!r} must be [first, last] steps with 1 <= first <= last "
                              "(or null: no profile)")


@dataclass
class CheckpointConfig:
    """Checkpoints go to ``OUT/checkpoints``. On SIGTERM/SIGUSR1 the run saves at the next step
    boundary and exits with ``preempt_exit_code`` (75 = EX_TEMPFAIL: "try again later"); a rank
    stuck in a collective cannot reach that point, and the run then ends after ``signal_grace_s``
    without a checkpoint, saying so.

    ``keep``: the newest complete checkpoints kept (older ones are deleted once a newer one is
    complete). ``if_unusable``: what ``--resume`` does when checkpoints exist but none passes its
    checks: ``fail`` (exit, listing each and why) or ``restart`` (from step 0). ``on_save_error``:
    a periodic save that fails (a full disk): ``stop`` the run, or ``continue`` training without it
    (recorded in the metrics); a save at the end or on a signal that fails always stops the run.
    ``async_save``: FSDP2's periodic saves overlap training (the state is copied to memory, then
    written, hashed and made ``latest`` in the background); DeepSpeed saves synchronously."""

    every_steps: int = 0  # 0 = only at the end and on a signal
    at_end: bool = True
    preempt_exit_code: int = exit_codes.PREEMPTED
    keep: int = 2
    if_unusable: str = "fail"  # fail | restart
    on_save_error: str = "stop"  # stop | continue
    signal_grace_s: float = 20.0  # under torchrun's 30 s between SIGTERM and SIGKILL
    # steps between the ranks' agreements on a signal; None: about every 2 s of step time (measured)
    signal_every_steps: int | None = None
    export_hf: bool = False  # at the end, the final checkpoint as a Hugging Face model in OUT/hf
    async_save: bool = True

    def validate(self) -> None:
        _positive("checkpoint", "every_steps", self.every_steps, allow_zero=True)
        _positive("checkpoint", "keep", self.keep)
        _positive("checkpoint", "signal_grace_s", self.signal_grace_s)
        _positive("checkpoint", "signal_every_steps", self.signal_every_steps)
        _choice("checkpoint", "if_unusable", self.if_unusable, ("fail", "restart"))
        _choice("checkpoint", "on_save_error", self.on_save_error, ("stop", "continue"))
        if not 1 <= self.preempt_exit_code <= 255:
            raise ConfigError(f"checkpoint.preempt_exit_code: {self.preempt_exit_code} must be "
                              "in 1..255 (0 would look like a finished run)")


@dataclass
class ScaleOutConfig:
    """Move the run to more nodes when its batch schedule outgrows the nodes in hand
    (bigbatch.training.callbacks.scale_out). ``max_nodes``: the largest allocation (0: off; the
    launcher's ``--max-nodes`` caps it). When the global batch in force needs more than
    ``max_grad_accum`` micro batches per device here (not counting the 2 micro batches per step that
    measuring the noise scale asks for) and fits within it on more nodes (up to
    ``max_nodes``), and the smoothed noise scale is at least ``noise_margin`` x that batch (0: do not
    ask it; None: the automatic schedule's ``growth_margin``, the test that grew the batch, else 1), the
    run saves a checkpoint and exits with exit code 76 for the launcher to resubmit it on
    the smallest node count that fits. Resumed on fewer nodes than it was saved on, the run keeps its
    batch within ``max_grad_accum`` there (rules applied downwards) and stays on those nodes."""

    max_nodes: int = 0
    max_grad_accum: int = 1
    noise_margin: float | None = None

    def validate(self) -> None:
        _positive("scale_out", "max_nodes", self.max_nodes, allow_zero=True)
        _positive("scale_out", "max_grad_accum", self.max_grad_accum)
        _positive("scale_out", "noise_margin", self.noise_margin, allow_zero=True)

    def margin(self, batch: BatchConfig) -> float:
        """The noise test's margin: ``noise_margin``, or by default the automatic schedule's
        ``growth_margin`` (a batch it grew is one the noise scale allows), else 1."""
        if self.noise_margin is not None:
            return self.noise_margin
        return batch.growth_margin if batch.schedule == "auto" else 1.0

    def check_against(self, batch: BatchConfig) -> None:
        """The policy moves along a batch schedule: without one the batch never outgrows a node."""
        if self.max_nodes and batch.schedule is None:
            raise ConfigError(f"scale_out.max_nodes: {self.max_nodes} needs batch.schedule (a list of [tokens, "
                              "global_batch] pairs or 'auto'): without one the batch never grows; set "
                              "scale_out.max_nodes 0 or give a schedule")


@dataclass
class DeepSpeedConfig:
    """The engine: a DeepSpeed JSON (``config``, e.g. configs/deepspeed/zero2.json) with
    ``zero_stage``/``precision`` and ``extra`` (a nested dict) applied on top."""

    config: str | None = None
    zero_stage: int | None = None  # None: the JSON's, else 0
    precision: str | None = None  # fp32 | bf16 | fp16; None: the JSON's, else fp32
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: {self.zero_stage!r} must be one of [0, 1, 2, 3]")
        if self.precision is not None:
            _choice("deepspeed", "precision", self.precision, ("fp32", "bf16", "fp16"))


@dataclass
class FSDP2Config:
    """PyTorch FSDP2 (``train.engine: fsdp2``): ``fully_shard`` per Transformer block and the root.
    ``precision: bf16`` computes in bf16 and reduces gradients in float32, with float32 weights
    and optimizer state in the shards."""

    precision: str = "fp32"  # fp32 | bf16
    reshard_after_forward: bool = True  # free the gathered weights after forward (ZeRO-3 style)
    activation_checkpointing: bool = False

    def validate(self) -> None:
        _choice("fsdp2", "precision", self.precision, ("fp32", "bf16"))


@dataclass
class LoggingConfig:
    progress: str = "auto"  # auto (bar on a terminal, else lines) | bar | lines | none
    tensorboard: bool = True  # used when the tensorboard package is installed
    plot: bool = True  # OUT/loss.png at the end
    # Weights & Biases beside TensorBoard (pip install 'bigbatch[wandb]'): every metrics record, the
    # resolved config and loss.png; files under OUT/wandb. mode None: $WANDB_MODE, else offline.
    wandb: bool = False
    wandb_project: str = "bigbatch"
    wandb_name: str | None = None  # None: the run directory's name
    wandb_mode: str | None = None  # online | offline | disabled

    def validate(self) -> None:
        _choice("logging", "progress", self.progress, ("auto", "bar", "lines", "none"))
        if self.wandb_mode is not None:
            _choice("logging", "wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))

    def check_installed(self) -> None:
        """W&B is asked for and importable."""
        if self.wandb:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("logging.wandb: true needs the wandb package, which is not installed; "
                                  "pip install 'bigbatch[wandb]' or set logging.wandb: false") from None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    fsdp2: FSDP2Config = field(default_factory=FSDP2Config)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    scale_out: ScaleOutConfig = field(default_factory=ScaleOutConfig)

    def validate(self, sections: tuple[str, ...] | None = None) -> "RunConfig":
        """Check every section, or only ``sections`` (a data-only config for prepare-data): the values
        alone, without side effects (nothing imported, built, read from disk or changed)."""
        for f in dataclasses.fields(self):
            if sections is None or f.name in sections:
                getattr(self, f.name).validate()
        if sections is None:
            self.scale_out.check_against(self.batch)
        return self

    def resolve(self, sections: tuple[str, ...] | None = None) -> "RunConfig":
        """:meth:`validate`, then the one step with effects, before any work: ``model.init_from``'s
        architecture and tokenizer taken in, the defaults that follow other sections filled
        (``batch.growth_min_tokens``), the optimizer built once on a one-element parameter to ask it, and
        the packages the config asks for found. Every loader of a run config ends here."""
        self.validate(sections)
        every = sections is None
        if every or "optim" in sections:
            self.optim.check_constructs()
        if every or "logging" in sections:
            self.logging.check_installed()
        if self.model.init_from and (every or "model" in sections):
            apply_init_from(self)
        if self.batch.growth_min_tokens is None and (every or "schedule" in sections):
            self.batch.growth_min_tokens = self.schedule.warmup_tokens
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def notes(self) -> list[str]:
        """Valid choices a user may not have meant, each one line, for the run to say once at start:
        a fixed batch schedule whose batch shrinks, and deepspeed settings that FSDP2 ignores (every
        shipped config has a deepspeed section, so ``--train.engine fsdp2`` over one is no error)."""
        out = []
        if isinstance(self.batch.schedule, list):
            for i in range(1, len(self.batch.schedule)):
                (_, before), (tokens, after) = self.batch.schedule[i - 1], self.batch.schedule[i]
                if after < before:
                    out.append(f"batch.schedule[{i}]: [{tokens}, {after}] shrinks the global batch from {before}; "
                               f"the rules then scale by kappa {after / before:g} < 1 (smaller lr and 1 - beta)")
        if self.train.engine != "deepspeed":
            ds, default = dataclasses.asdict(self.deepspeed), dataclasses.asdict(DeepSpeedConfig())
            ignored = [f"deepspeed.{k}" for k in ds if ds[k] != default[k]]
            if ignored:
                out.append(f"{', '.join(ignored)}: ignored, train.engine is {self.train.engine!r} (its settings are "
                           f"the {self.train.engine} section's)")
        return out


_FREE_FORM = {("optim", "hparams"), ("optim", "kwargs"), ("deepspeed", "extra")}  # any key, numbers coerced


def load_config(path: str | os.PathLike | None = None,
                overrides: list[tuple[str, str]] | list[str] | None = None,
                sections: tuple[str, ...] | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides, then validated (only ``sections`` when given).
    ``overrides`` are (dotted key, value) pairs or raw ``--section.key value`` strings."""
    cfg = RunConfig()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: file {str(path)!r} does not exist")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config: {path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {path}: expected a mapping of sections at the top level")
        for name, value in data.items():
            apply_key(cfg, [str(name)], value, str(path), _FREE_FORM)
    if overrides:
        if isinstance(overrides[0], str):
            overrides = parse_overrides(list(overrides))  # type: ignore[arg-type]
        for key, value in overrides:  # type: ignore[misc]
            apply_key(cfg, key.split("."), value, f"--{key}", _FREE_FORM)
    return cfg.resolve(sections)


def apply_overrides(cfg: RunConfig, overrides: list[tuple[str, str]]) -> RunConfig:
    """Apply (dotted key, value) pairs to ``cfg`` in place and validate it."""
    for key, value in overrides:
        apply_key(cfg, key.split("."), value, f"--{key}", _FREE_FORM)
    return cfg.resolve()


def config_from_dict(data: dict, run_files=None) -> RunConfig:
    """Rebuild a RunConfig from ``to_dict()`` output (e.g. a resolved YAML); ``run_files(cfg)`` adjusts
    it before validation (a saved run's own model files)."""
    cfg = RunConfig()
    for name, value in data.items():
        apply_key(cfg, [str(name)], value, "dict", _FREE_FORM)
    if run_files is not None:
        run_files(cfg)
    return cfg.resolve()
