"""The command line's plumbing: :func:`command_main` (a bad input is exit 2 and one line), and an
``argparse.ArgumentParser`` whose usage errors are one line and exit 2 too (argparse prints the whole
usage block first)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from bigbatch import exit_codes
from bigbatch.errors import ConfigError


def command_main(body: Callable[[], int], teardown: Callable[[], None] | None = None) -> int:
    """An entry point's exit code: ``body()``'s, or 2 with one ``error:`` line for a ConfigError;
    ``teardown()`` runs either way (the process group of a training command)."""
    try:
        return body()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exit_codes.BAD_INPUT
    finally:
        if teardown is not None:
            teardown()


class ArgumentParser(argparse.ArgumentParser):
    """Errors print ``PROG: error: MESSAGE (see PROG --help)`` on one line; no prefix
    abbreviations, so a mistyped option is refused instead of taken for a longer one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(exit_codes.BAD_INPUT)
