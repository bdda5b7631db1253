"""What third-party libraries print that says nothing to a bigbatch user, kept out of the commands'
output: DeepSpeed's accelerator guess on CPU and its warning about a client optimizer under ZeRO
(bigbatch's optimizers are client optimizers by design), torch's deprecation warnings for the
collectives DeepSpeed calls, and transformers' progress bar when it writes a model.

:func:`quiet_third_party` runs when ``bigbatch.training`` is first imported (every command that
trains, checks, exports or reports imports it before DeepSpeed). ``BIGBATCH_LOG_LEVEL=debug`` keeps
everything (and sets the ``bigbatch`` loggers to DEBUG).
"""

from __future__ import annotations

import logging
import os
import warnings

LEVEL_ENV = "BIGBATCH_LOG_LEVEL"
#: DeepSpeed log messages (substrings) that say nothing to the user of a bigbatch command
DEEPSPEED_NOISE = ("Setting accelerator to CPU", "You are using ZeRO with an untested optimizer")
_done = False


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def debug() -> bool:
    return os.environ.get(LEVEL_ENV, "").strip().lower() == "debug"


def quiet_third_party() -> None:
    """Install the filters (once per process; nothing with ``BIGBATCH_LOG_LEVEL=debug``)."""
    global _done
    if _done:
        return
    _done = True
    if debug():
        logging.getLogger("bigbatch").setLevel(logging.DEBUG)
        return
    # DeepSpeed creates its logger on import and keeps filters added to it before
    logging.getLogger("DeepSpeed").addFilter(_Drop(DEEPSPEED_NOISE))
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
