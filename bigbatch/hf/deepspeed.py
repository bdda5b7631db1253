"""DeepSpeed configs for the HF Trainer / Accelerate: take the optimizer block out when bigbatch builds it.

The Trainer hands a config's ``"optimizer"`` block to DeepSpeed (``DummyOptim``), and DeepSpeed knows
neither AdaBound, AMSBound nor RAdam-with-our-semantics. :func:`split_optimizer_block` removes a block
naming an optimizer of bigbatch's registry (ours, a class path, ...) and returns it; the Trainer then
builds it from the training arguments (its decay / no-decay groups) and gives it to DeepSpeed as the
client optimizer. DeepSpeed's own types (``AdamW``, ``Lamb``, ...) are left to DeepSpeed. ``"auto"`` values are filled by :meth:`OptimizerBlock.fill` as HF fills lr,
betas, eps and weight_decay; ``final_lr``, ``gamma`` and the rest from ``optim_args`` or the
constructor's defaults.
The block checks themselves are :func:`bigbatch.sharding.deepspeed_config.take_optimizer_block`, shared with
bigbatch's own engine builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bigbatch.optim.registry import BIGBATCH_OPTIMIZERS, constructor_defaults, get_optimizer_class
from bigbatch.sharding.deepspeed_config import DSConfigError, is_auto, load_ds_config, take_optimizer_block

#: optimizer param -> (TrainingArguments field, getter)
_FROM_ARGS = {
    "lr": ("learning_rate", lambda a: a.learning_rate),
    "betas": ("adam_beta1+adam_beta2", lambda a: (a.adam_beta1, a.adam_beta2)),
    "eps": ("adam_epsilon", lambda a: a.adam_epsilon),
    "weight_decay": ("weight_decay", lambda a: a.weight_decay),
}


@dataclass
class OptimizerBlock:
    """A DeepSpeed ``"optimizer"`` block naming one of our optimizers (``name`` is the short name)."""

    name: str
    params: dict = field(default_factory=dict)

    def fill(self, args, optim_args: dict) -> dict:
        """Resolve ``"auto"`` and check consistency; return the kwargs for ``optim_args``.

        ``lr``/``betas``/``eps``/``weight_decay`` must equal the training arguments (``"auto"`` takes
        them), like HF's ``fill_match``; they stay in the arguments. Other keys: ``"auto"`` takes
        ``optim_args``' value, else the default; a value must not contradict ``optim_args``.
        """
        defaults = constructor_defaults(get_optimizer_class(self.name))
        out = dict(optim_args)
        for key, value in self.params.items():
            if key in _FROM_ARGS:
                arg_name, get = _FROM_ARGS[key]
                if not is_auto(value):
                    want = get(args)
                    got = tuple(value) if isinstance(value, list) else value
                    if got != want:
                        raise DSConfigError(f"optimizer.params.{key}={value!r} in the DeepSpeed config but the training "
                                            f"argument {arg_name}={want!r}; set it to \"auto\" or make them equal")
                continue
            if is_auto(value):
                if key not in out:
                    if key not in defaults:
                        raise DSConfigError(f"optimizer.params.{key}=\"auto\": no optim_args value and no default")
                    out[key] = defaults[key]
            elif key in out and out[key] != value:
                raise DSConfigError(f"optimizer.params.{key}={value!r} in the DeepSpeed config contradicts "
                                    f"optim_args {key}={out[key]!r}")
            else:
                out[key] = value
        return out


def split_optimizer_block(ds_config, default_type: str | None = None) -> tuple[dict, OptimizerBlock | None]:
    """``(config without the block, the block)``; ``(config, None)`` when DeepSpeed builds it.

    ``"type": "auto"`` (as in ``configs/deepspeed/``) takes ``default_type`` (the optimizer named on
    the command line).

    Sets ``zero_allow_untested_optimizer`` (and ``zero_force_ds_cpu_optimizer: false`` with optimizer
    offload) as DeepSpeed requires for a client optimizer. Raises :class:`DSConfigError` naming the field.
    """
    cfg = load_ds_config(ds_config)
    auto_type = isinstance(cfg.get("optimizer"), dict) and is_auto(cfg["optimizer"].get("type"))
    if auto_type and default_type is None:
        raise DSConfigError(f"optimizer.type=\"auto\": name the optimizer (optim=), e.g. one of {list(BIGBATCH_OPTIMIZERS)}, "
                            f"got {default_type!r}; or give the type in the config")
    if "optimizer" not in cfg:
        return cfg, None
    choice = take_optimizer_block(cfg, default_type)
    if choice is None or choice.cls is None:
        return cfg, None
    return cfg, OptimizerBlock(name=choice.name, params=choice.params)
