"""The trained model as a Hugging Face model directory at the end of the run."""

from __future__ import annotations

import os

from bigbatch.training.callbacks.base import Callback
from bigbatch.training.export import export_run


class HFExport(Callback):
    """After the final save, the main rank writes ``RUN_DIR/<subdir>`` from that checkpoint with
    :func:`bigbatch.training.export.export_run` (``checkpoint.export_hf``). The other ranks wait at
    the run's final barrier."""

    priority = 65

    def __init__(self, subdir: str = "hf"):
        self.subdir = subdir

    def on_end(self, trainer) -> None:
        if trainer.info.is_main:
            path = export_run(trainer.out, os.path.join(trainer.out, self.subdir), overwrite=True)
            print(f"Hugging Face model: {path}", flush=True)
