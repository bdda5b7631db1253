"""Optimizers named by a string or a class path (as litgpt does).

``get_optimizer_class("adabound")``, ``get_optimizer_class("torch.optim.AdamW")`` and
``get_optimizer_class(AdaBound)`` all return a class; ``canonical_name`` maps a class back to the
short name that the scaling rules and configs use.
"""

from __future__ import annotations

import importlib

import torch

from bigbatch.optim.adabound import AdaBound, AMSBound
from bigbatch.optim.radam import RAdam

# Short names, case-insensitive. Ours first; torch's "radam" is deliberately shadowed by ours.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adabound": AdaBound,
    "amsbound": AMSBound,
    "radam": RAdam,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
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
    return None
