"""The optimizer registry: every fact about optimizers that other parts of bigbatch need.

An optimizer is named by a short name (``"adabound"``), a dotted class path
(``"torch.optim.AdamW"``) or a class, as litgpt does; :func:`get_optimizer_class` resolves any of
them, and whatever it accepts works everywhere (train.py, ``bigbatch.sharding.build_engine``, the HF
integration). :func:`canonical_name` maps a class back to the short name whose scaling rule applies
(subclasses take their base's, DeepSpeed's Adam classes AdamW's); :func:`constructor_params` /
:func:`constructor_defaults` read a class's keyword arguments.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from bigbatch.optim.adabound import AdaBound, AMSBound
from bigbatch.optim.radam import RAdam

#: bigbatch's own optimizers; under these names they shadow torch's RAdam and the HF Trainer's names
BIGBATCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adabound": AdaBound,
    "amsbound": AMSBound,
    "radam": RAdam,
}

#: short names, case-insensitive
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    **BIGBATCH_OPTIMIZERS,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


#: other libraries' implementations of a known optimizer, by class path: their rule is its rule.
#: DeepSpeed's CPU and fused Adam decouple weight decay by default (adamw_mode / adam_w_mode).
EQUIVALENTS: dict[str, str] = {
    "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam": "adamw",
    "deepspeed.ops.adam.fused_adam.FusedAdam": "adamw",
}


def get_optimizer_class(name: str | type) -> type[torch.optim.Optimizer]:
    """Resolve a short name (``"adabound"``), a dotted class path or a class to a class."""
    if isinstance(name, type):
        if not issubclass(name, torch.optim.Optimizer):
            raise TypeError(f"optimizer: {name!r} is not a torch.optim.Optimizer subclass")
        return name
    if not isinstance(name, str) or not name:
        raise ValueError(f"optimizer: expected a name or a class, got {name!r}")
    key = name.lower()
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"optimizer: cannot import class path {name!r} ({exc})") from None
        return get_optimizer_class(cls)
    raise ValueError(
        f"optimizer: unknown name {name!r}; known names are {sorted(OPTIMIZERS)}"
        " or a dotted class path such as 'torch.optim.AdamW'"
    )


def canonical_name(optimizer: str | type) -> str | None:
    """The short name of an optimizer class (subclasses resolve to their nearest known base)."""
    cls = get_optimizer_class(optimizer)
    for klass in cls.__mro__:
        for short, known in OPTIMIZERS.items():
            if klass is known:
                return short
        equivalent = EQUIVALENTS.get(f"{klass.__module__}.{klass.__qualname__}")
        if equivalent is not None:
            return equivalent
    return None


def is_bigbatch_optimizer(optimizer: str | type) -> bool:
    """Whether ``optimizer`` names one of :data:`BIGBATCH_OPTIMIZERS` (by short name or class)."""
    if isinstance(optimizer, str) and optimizer.lower() in BIGBATCH_OPTIMIZERS:
        return True
    return isinstance(optimizer, type) and any(optimizer is c for c in BIGBATCH_OPTIMIZERS.values())


def constructor_params(cls: type) -> set[str]:
    """Keyword names that ``cls.__init__`` takes besides ``params``."""
    sig = inspect.signature(cls.__init__)
    return {n for n, p in sig.parameters.items()
            if n not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def takes_any_keyword(cls: type) -> bool:
    """Whether ``cls.__init__`` has a ``**kwargs``."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def constructor_defaults(cls: type) -> dict:
    """``{name: default}`` of the keyword arguments of ``cls.__init__`` that have one."""
    sig = inspect.signature(cls.__init__)
    return {n: p.default for n, p in sig.parameters.items()
            if n in constructor_params(cls) and p.default is not inspect.Parameter.empty}


def check_kwargs(cls: type, kwargs, what: str) -> None:
    """Raise ValueError naming the first key of ``kwargs`` that ``cls`` does not take."""
    if takes_any_keyword(cls):
        return
    allowed = sorted(constructor_params(cls))
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"{what}: {key!r} is not an argument of {cls.__qualname__}; allowed: {allowed}")
