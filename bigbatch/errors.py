"""The error every command turns into exit code 2 and one line (``command_main``)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad run configuration or argument; the message names the key, the value and what is allowed."""
