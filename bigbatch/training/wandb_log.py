"""Weights & Biases for a run (``logging.wandb``): the project, the run name, the resolved config,
every metrics record and, at the end, ``loss.png``. Files go under ``OUT/wandb``; the mode is
``logging.wandb_mode``, else ``$WANDB_MODE``, else ``offline`` (no network; ``wandb sync`` uploads
later)."""

from __future__ import annotations

import math
import os
import time


class WandbRun:
    """One W&B run beside ``metrics.jsonl``. ``config``: the resolved run config (a dict with the
    ``logging`` section)."""

    def __init__(self, out_dir: str, config: dict):
        import wandb

        log = config.get("logging", {})
        mode = log.get("wandb_mode") or os.environ.get("WANDB_MODE") or "offline"
        self.out_dir = out_dir
        self.started = time.time()
        self.run = wandb.init(project=log.get("wandb_project") or "bigbatch",
                              name=log.get("wandb_name") or os.path.basename(os.path.abspath(out_dir)),
                              config=config, dir=out_dir, mode=mode, reinit="finish_previous")

    def log(self, record: dict) -> None:
        """A metrics record as ``<kind>/<key>`` values at its step (strings such as warnings kept)."""
        kind = record.get("kind", "train")
        data = {f"{kind}/{k}": v for k, v in record.items()
                if k not in ("kind", "step") and v is not None
                and (isinstance(v, str) or (isinstance(v, (int, float)) and math.isfinite(v)))}
        self.run.log(data, step=int(record.get("step", 0)))

    def finish(self, png: str | None = None) -> None:
        """Attach ``png`` (the loss plot) when this run wrote it, and close the run."""
        import wandb

        if png and os.path.isfile(png) and os.path.getmtime(png) >= self.started - 1:
            self.run.log({"loss_plot": wandb.Image(png)})
        self.run.finish()
