"""``argparse.ArgumentParser`` whose usage errors are one line and exit 2, like every other bad
input of bigbatch's commands (argparse prints the whole usage block first)."""

from __future__ import annotations

import argparse
import sys

from bigbatch import exit_codes


class ArgumentParser(argparse.ArgumentParser):
    """Errors print ``PROG: error: MESSAGE (see PROG --help)`` on one line; no prefix
    abbreviations, so a mistyped option is refused instead of taken for a longer one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(exit_codes.BAD_INPUT)
