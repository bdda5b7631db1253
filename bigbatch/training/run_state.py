"""How a run ends early."""

from __future__ import annotations


class RunStopped(Exception):
    """The run cannot go on; every rank raises it at the same point. ``exit_code``: the process's."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
