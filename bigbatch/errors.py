"""The error every command turns into exit code 2 and one line (``command_main``), and the checks of
config values that raise it."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad run configuration or argument; the message names the key, the value and what is allowed."""


def check_choice(section: str, key: str, value: Any, allowed: tuple) -> None:
    """``section.key``'s ``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{section}.{key}: {value!r} is not allowed; choose one of {list(allowed)}")


def check_positive(section: str, key: str, value: Any, *, allow_zero: bool = False) -> None:
    """``section.key``'s ``value`` (None: unset) must be > 0, or >= 0 with ``allow_zero``."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{key}: {value!r} must be {bound}")
