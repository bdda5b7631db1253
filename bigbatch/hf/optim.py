"""Our optimizers for the HF Trainer: a name and ``optim_args`` -> ``(optimizer_cls, kwargs)``.

The Trainer builds its decay / no-decay parameter groups (each with its ``weight_decay``) and calls
``optimizer_cls(groups, **kwargs)``; so ``kwargs`` never holds ``weight_decay``. ``lr``, ``betas``
and ``eps`` come from the training arguments as the Trainer does for Adam (``learning_rate``,
``adam_beta1``/``adam_beta2``, ``adam_epsilon``); the rest (``final_lr``, ``gamma``, ``amsbound``,
``decoupled_weight_decay``, ``degenerated_to_sgd``, ...) from ``optim_args`` ("k=v,k=v") or keywords.
"""

from __future__ import annotations

import ast
from typing import Any

import torch

from bigbatch.optim.registry import canonical_name, constructor_defaults, constructor_params, get_optimizer_class

#: taken from the TrainingArguments, never from optim_args (one source per value)
FROM_ARGS = ("lr", "betas", "eps")
#: set per parameter group by the Trainer
GROUP_KEYS = ("weight_decay",)


def _coerce(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"optim_args: {key}={text!r} is not a boolean (true/false)")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"optim_args: {key}={text!r} is not a number or literal") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def parse_optim_args(optim_args: str | dict | None, optimizer: str | type) -> dict[str, Any]:
    """``"final_lr=0.1,gamma=1e-3"`` (or a dict) -> typed kwargs, checked against the constructor."""
    cls = get_optimizer_class(optimizer)
    allowed = constructor_params(cls)
    defaults = constructor_defaults(cls)
    if optim_args is None or optim_args == "":
        return {}
    if isinstance(optim_args, dict):
        items = list(optim_args.items())
    elif isinstance(optim_args, str):
        items = []
        for part in optim_args.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"optim_args: {part!r} is not of the form key=value")
            k, _, v = part.partition("=")
            items.append((k.strip(), v.strip()))
    else:
        raise ValueError(f"optim_args: expected a 'k=v,k=v' string or a dict, got {type(optim_args).__name__}")
    out: dict[str, Any] = {}
    for k, v in items:
        if k in FROM_ARGS or k in GROUP_KEYS:
            src = {"lr": "learning_rate", "betas": "adam_beta1/adam_beta2", "eps": "adam_epsilon",
                   "weight_decay": "weight_decay"}[k]
            raise ValueError(f"optim_args: {k} is set by the training argument {src}, not by optim_args")
        if k not in allowed:
            raise ValueError(f"optim_args: {cls.__name__} takes no {k!r}; allowed: "
                             f"{sorted(allowed - set(FROM_ARGS) - set(GROUP_KEYS))}")
        out[k] = _coerce(k, v, defaults.get(k)) if isinstance(v, str) else v
    return out


def format_optim_args(kwargs: dict[str, Any]) -> str:
    """Inverse of :func:`parse_optim_args` (floats by ``repr``, so exact)."""
    for k, v in kwargs.items():
        if isinstance(v, (list, tuple, dict, str)):
            raise ValueError(f"optim_args: {k}={v!r} cannot be written as k=v (numbers and booleans only)")
    return ",".join(f"{k}={v!r}" for k, v in kwargs.items())


def _check_range(cls: type, kwargs: dict) -> None:
    # Build on a dummy tensor: the constructor's own checks (lr >= 0, 0 <= beta < 1, ...) name the value.
    try:
        cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {exc}") from None


def optimizer_cls_and_kwargs(name: str | type, args=None, **hparams) -> tuple[type[torch.optim.Optimizer], dict]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Args:
        name: ``"adabound"``, ``"amsbound"``, ``"radam"`` (or any name/class of the registry).
        args: ``TrainingArguments``; ``lr``/``betas``/``eps`` and ``optim_args`` are read from it.
        hparams: more constructor kwargs; they win over ``args.optim_args``.
    Raises ``ValueError`` naming the bad name, key or value.
    """
    cls = get_optimizer_class(name)
    allowed = constructor_params(cls)
    kwargs: dict[str, Any] = {}
    if args is not None:
        from_args = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
        kwargs.update({k: v for k, v in from_args.items() if k in allowed})
        kwargs.update(parse_optim_args(args.optim_args, cls))
    for k, v in hparams.items():
        if k not in allowed or k in GROUP_KEYS:
            raise ValueError(f"{cls.__name__} takes no {k!r} here; allowed: {sorted(allowed - set(GROUP_KEYS))}")
        kwargs[k] = tuple(v) if k == "betas" else v
    _check_range(cls, kwargs)
    return cls, kwargs


def short_name(optimizer) -> str:
    return canonical_name(optimizer) or getattr(optimizer, "__name__", str(optimizer))


__all__ = ["optimizer_cls_and_kwargs", "parse_optim_args", "format_optim_args"]
