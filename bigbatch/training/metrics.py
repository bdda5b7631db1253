"""Run outputs on rank 0: ``metrics.jsonl``, TensorBoard, progress display, loss-curve PNG.

``metrics.jsonl`` holds one JSON object per line. Train records have ``kind: "train"`` and at
least ``step, samples, tokens, loss, lr, grad_norm, tokens_per_s`` plus the other scaled
hyperparameters; eval records have ``kind: "eval"`` with ``eval_loss`` and ``eval_ppl``; a
``noise_scale`` key appears on train records when it was measured; train records carry
``global_batch`` and ``kappa`` (relative to the reference batch). ``batch_change`` records mark a
change of the global batch (old and new batch, kappa, the new hyperparameters); ``warning``
records a global batch past ``warn_factor`` x the noise scale.

With ``logging.wandb``, every record also goes to Weights & Biases
(:mod:`bigbatch.training.wandb_log`): the W&B run starts with the resolved config, and ``loss.png`` is
attached when the logger closes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from bigbatch import atomic
from bigbatch.training.wandb_log import WandbRun  # imports wandb (an optional extra) only when a run starts

TRAIN_KEYS = ("step", "samples", "tokens", "loss", "lr", "grad_norm", "tokens_per_s")
EVAL_KEYS = ("step", "samples", "tokens", "eval_loss", "eval_ppl")


def format_value(value) -> str:
    """A hyperparameter for a line a user reads: floats to 4 significant digits (0.6, not
    0.6000000000000001), sequences element-wise."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    return str(value)


def format_hparams(hparams: dict) -> str:
    """``lr 0.003, betas (0.9, 0.99), ...``."""
    return ", ".join(f"{k} {format_value(v)}" for k, v in hparams.items())


def hparam_fields(hparams: dict) -> dict:
    """The scaled constants beside lr, as flat record fields (``betas`` -> ``beta1``, ``beta2``)."""
    out = {}
    for k, v in hparams.items():
        if isinstance(v, (list, tuple)):
            out.update({f"beta{i + 1}" if k == "betas" else f"{k}_{i}": x for i, x in enumerate(v)})
        elif k != "lr" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


class StepWindow:
    """The steps since the last train record and their seconds on the host (evaluations and saves left
    out): what tokens/s and MFU are measured over."""

    def __init__(self):
        self.steps, self.seconds = 0, 0.0

    def add(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return self.steps * tokens_per_step / self.seconds if self.seconds > 0 else float("nan")

    def reset(self) -> None:
        self.steps, self.seconds = 0, 0.0


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl``; a last line cut short by a kill is skipped."""
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return out


def last_logged_step(path: str) -> int:
    """The largest ``step`` of the records in ``path`` (0 without any; a line cut short by a kill is
    skipped)."""
    last = 0
    if os.path.isfile(path):
        with open(path) as fh:
            for line in fh:
                try:
                    last = max(last, int(json.loads(line).get("step", 0) or 0))
                except (ValueError, AttributeError, TypeError):
                    continue
    return last


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop records logged after ``last_step`` (they belong to steps a resume will redo);
    rewritten atomically. A restart from step 0 of a run that had logged steps keeps that history:
    the file is renamed ``metrics.jsonl.<UTC time>`` (never deleted) and a new one begins."""
    if not os.path.isfile(path):
        return
    if last_step == 0 and last_logged_step(path) > 0:
        aside = f"{path}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        n = 1
        while os.path.exists(aside):
            aside, n = f"{path}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{n}", n + 1
        os.replace(path, aside)
        print(f"metrics: starting from step 0; the earlier history (to step {last_logged_step(aside)}) is kept "
              f"in {aside}", flush=True)
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _usage(record: dict, short: bool = False) -> dict:
    """MFU and peak memory of a train record for the progress display (where the record has them)."""
    out = {}
    mfu, mem = record.get("mfu"), record.get("mem_gb")
    if isinstance(mfu, float) and math.isfinite(mfu):
        out["mfu"] = f"{100 * mfu:.1f}%"
    if isinstance(mem, float) and math.isfinite(mem):
        out["mem" if short else "mem_gb"] = f"{mem:.2f}{'G' if short else ''}"
    return out


class Progress:
    """A tqdm bar on a terminal, else one plain line per logged step (or nothing)."""

    def __init__(self, mode: str, total_steps: int, initial: int = 0, enabled: bool = True):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict | None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if record is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}", **_usage(record, short=True))
        elif self.mode == "lines" and record is not None:
            usage = "".join(f" | {k} {v}" for k, v in _usage(record).items())
            print(f"step {record['step']:>6} | tokens {record['tokens']:>11,} | loss {record['loss']:.4f}"
                  f" | lr {record['lr']:.3e} | grad_norm {record['grad_norm']:.3f}"
                  f" | {record['tokens_per_s']:,.0f} tok/s{usage}", flush=True)

    def set_total(self, total_steps: int) -> None:
        """The run's step count changed (a batch change)."""
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def write(self, text: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger:
    """Appends records to ``out_dir/metrics.jsonl`` (flushed per line so a killed run keeps
    what it logged) and mirrors scalars to TensorBoard when it is installed and enabled, and to
    W&B when ``wandb`` is on (the run starts at :meth:`describe`, with the resolved config). Inactive
    (no files) on ranks other than 0."""

    def __init__(self, out_dir: str, *, active: bool, tensorboard: bool = True, wandb: bool = False):
        self.active = active
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        self.wandb = None
        self._fh = None
        self._write_failed = False
        if not active:
            return
        self._fh = open(self.path, "a")
        self._wandb_pending = [] if wandb else None  # records before describe() starts W&B
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.active:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        record.setdefault("time", time.time())
        try:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        except OSError as exc:  # a full disk must not end the run: the checkpoint code reports it
            if not self._write_failed:
                print(f"warning: {self.path}: cannot write metrics ({exc.strerror or exc}); records are lost "
                      "until it can", file=sys.stderr, flush=True)
            self._write_failed = True
            return
        self._write_failed = False
        if self.tb is not None:
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for k, v in record.items():
                if k not in ("step", "time", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])
        if self.wandb is not None:
            self.wandb.log(record)
        elif self._wandb_pending is not None:
            self._wandb_pending.append(record)

    def describe(self, config: dict) -> None:
        """The resolved run config (plan, sizes) once it is known: starts the W&B run with it."""
        if not self.active or self._wandb_pending is None:
            return

        self.wandb = WandbRun(os.path.dirname(self.path), config)
        for record in self._wandb_pending:
            self.wandb.log(record)
        self._wandb_pending = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish(os.path.join(os.path.dirname(self.path), "loss.png"))
            self.wandb = None


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str, dpi: int = 100) -> str:
    """Lay out ``fig``, write it to ``path`` as a PNG whole or not at all, and close it."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return path


def plot_losses(metrics_path: str, png_path: str, title: str = "") -> str:
    """Train and eval loss, the learning rate (with AdaBound's clipped shares), and the global batch
    with the measured gradient noise scale, against tokens, as a PNG (written atomically)."""
    plt = pyplot()
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("eval_loss") is not None]
    fig, (ax_loss, ax_lr, ax_batch) = plt.subplots(3, 1, figsize=(7, 8), sharex=True,
                                                   gridspec_kw={"height_ratios": [3, 1, 1.3]})
    if train:
        ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
        ax_lr.plot([r["tokens"] for r in train], [r["lr"] for r in train], color="tab:gray")
    if evals:
        ax_loss.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
        last = evals[-1]
        ax_loss.annotate(f"ppl {last['eval_ppl']:.1f}", (last["tokens"], last["eval_loss"]),
                         textcoords="offset points", xytext=(-10, 10), ha="right")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title(title)
    ax_lr.set_ylabel("lr")
    ax_lr.grid(alpha=0.3)
    clipped = [r for r in train if "clipped_lower" in r]
    if clipped:  # AdaBound: how much of the model its bounds have moved towards SGD
        ax_clip = ax_lr.twinx()
        x = [r["tokens"] for r in clipped]
        ax_clip.plot(x, [r["clipped_lower"] for r in clipped], "--", color="tab:red", lw=1, label="below lower bound")
        ax_clip.plot(x, [r["clipped_upper"] for r in clipped], ":", color="tab:red", lw=1, label="above upper bound")
        ax_clip.set_ylabel("clipped share", color="tab:red")
        ax_clip.set_ylim(0, 1)
        ax_clip.legend(fontsize=7, loc="upper right")
    batched = [r for r in train if r.get("global_batch")]
    if batched:
        ax_batch.step([0] + [r["tokens"] for r in batched], [batched[0]["global_batch"]] +
                      [r["global_batch"] for r in batched], where="pre", color="tab:blue", label="global batch")
    noisy = [r for r in train if r.get("noise_scale")]
    if noisy:
        ax_batch.plot([r["tokens"] for r in noisy], [r["noise_scale"] for r in noisy], ".", ms=3, color="tab:orange",
                      label="noise scale B_noise")
    if batched or noisy:
        ax_batch.set_yscale("log", base=2)
        ax_batch.legend(fontsize=8)
    ax_batch.set_ylabel("sequences")
    ax_batch.set_xlabel("tokens")
    ax_batch.grid(alpha=0.3)
    return save_png(fig, png_path)
