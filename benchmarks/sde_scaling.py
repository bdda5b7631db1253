"""Evidence for the batch-size scaling rules: a noisy quadratic, at batch B and kappa * B.

The problem: ``L(theta) = 1/2 sum_i h_i theta_i^2`` with ``h`` spread over [0.2, 1]; the mean
gradient of a batch of B samples is ``h * theta + xi / sqrt(B)``, ``xi ~ N(0, sigma^2 I)`` (the exact
law of a mean of B Gaussian per-sample gradients). ``replicas`` independent runs are one
``(replicas, dim)`` parameter, stepped by the real optimizer (torch.optim.Adam, torch.optim.SGD,
bigbatch.optim.AdaBound), which is elementwise, so the replicas do not interact.

For each optimizer three runs see the same number of samples: reference hparams at batch B;
``scale_hparams(..., kappa)`` at kappa * B ("scaled"); the reference hparams at kappa * B
("unscaled"). The stationary loss is the mean over the last quarter of the samples; its standard
error comes from the spread over replicas (independent by construction).

    python benchmarks/sde_scaling.py --out runs/sde_scaling.png

prints a table and writes the loss-per-sample curves as a PNG.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from bigbatch.optim import AdaBound
from bigbatch.scaling import scale_hparams

SIGMA = 1.0
BASE_BATCH = 16
KAPPA = 4
SAMPLES = BASE_BATCH * 4000

# Reference hyperparameters, tuned at BASE_BATCH. Step sizes are small enough that the SDE limit
# holds at kappa * B too (SGD: lr * h_max * kappa = 0.04, a 2% discretisation effect on the
# stationary variance, see tests/test_sde_rules.py). beta2 = 0.99 (a 100-step memory at B) lets
# the second moment settle within the run; with 0.999 it still drifts at the end.
EXPERIMENTS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}),
    "sgd": (torch.optim.SGD, {"lr": 2e-3, "momentum": 0.9}),
    "adabound": (
        AdaBound,
        {"lr": 1e-2, "betas": (0.9, 0.99), "final_lr": 1e-2, "gamma": 1e-2, "eps": 1e-8, "fused": False},
    ),
}


@dataclass(frozen=True)
class SimResult:
    samples: torch.Tensor  # (records,) samples processed at each record
    loss: torch.Tensor  # (records,) loss averaged over replicas
    stationary: float  # mean loss over the last quarter of the samples
    stationary_se: float  # its standard error over replicas


def simulate(
    optimizer_cls: type[torch.optim.Optimizer],
    hparams: dict[str, Any],
    batch: int,
    samples: int = SAMPLES,
    *,
    replicas: int = 64,
    dim: int = 64,
    seed: int = 0,
    records: int = 200,
) -> SimResult:
    """Run ``samples / batch`` steps on the noisy quadratic; losses are per replica, summed over dims."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.linspace(0.2, 1.0, dim)
    theta = torch.nn.Parameter(torch.ones(replicas, dim))
    opt = optimizer_cls([theta], **hparams)
    steps = samples // batch
    every = max(1, steps // records)
    noise_std = SIGMA / math.sqrt(batch)
    tail_from = steps - steps // 4
    tail = torch.zeros(replicas, dtype=torch.float64)
    xs, ys = [], []
    for t in range(steps):
        with torch.no_grad():
            theta.grad = h * theta + noise_std * torch.randn(replicas, dim, generator=gen)
        opt.step()
        with torch.no_grad():
            loss = 0.5 * (h * theta.square()).sum(dim=1).double()  # (replicas,)
        if t >= tail_from:
            tail += loss
        if (t + 1) % every == 0:
            xs.append((t + 1) * batch)
            ys.append(float(loss.mean()))
    per_replica = tail / (steps - tail_from)
    return SimResult(
        torch.tensor(xs, dtype=torch.float64),
        torch.tensor(ys, dtype=torch.float64),
        float(per_replica.mean()),
        float(per_replica.std() / math.sqrt(replicas)),
    )


def run_experiment(name: str, kappa: int = KAPPA, **kw: Any) -> dict[str, SimResult]:
    """Reference at BASE_BATCH, scaled and unscaled at ``kappa * BASE_BATCH``, same samples."""
    cls, hp = EXPERIMENTS[name]
    big = BASE_BATCH * kappa
    return {
        "reference": simulate(cls, hp, BASE_BATCH, seed=1, **kw),
        # AdaBound runs into its SGD phase here (gamma * steps = 40): the regime of bound_form "linear"
        "scaled": simulate(cls, scale_hparams(cls, hp, kappa, bound_form="linear"), big, seed=2, **kw),
        "unscaled": simulate(cls, hp, big, seed=3, **kw),
    }


def plot(results: dict[str, dict[str, SimResult]], path: str) -> None:
    from bigbatch.training.metrics import pyplot, save_png

    plt = pyplot()

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    styles = {
        "reference": ("black", "-", f"B={BASE_BATCH}"),
        "scaled": ("tab:blue", "--", f"B={BASE_BATCH * KAPPA}, scaled"),
        "unscaled": ("tab:red", ":", f"B={BASE_BATCH * KAPPA}, unscaled"),
    }
    for ax, (name, runs) in zip(axes[0], results.items()):
        for run, r in runs.items():
            color, ls, label = styles[run]
            ax.plot(r.samples, r.loss, color=color, ls=ls, label=f"{label}: {r.stationary:.4g}")
        ax.set_yscale("log")
        ax.set_xlabel("samples processed")
        ax.set_ylabel("loss (mean over replicas)")
        ax.set_title(f"{name}: kappa={KAPPA}")
        ax.legend(title="stationary loss", fontsize=8)
    save_png(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/sde_scaling.png", help="PNG path")
    parser.add_argument("--replicas", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    print(f"{'optimizer':10} {'run':9} {'batch':>5} {'stationary loss':>16} {'se':>8} {'ratio to ref':>12}")
    for name in EXPERIMENTS:
        t0 = time.perf_counter()
        results[name] = runs = run_experiment(name, replicas=args.replicas)
        ref = runs["reference"].stationary
        for run, r in runs.items():
            batch = BASE_BATCH if run == "reference" else BASE_BATCH * KAPPA
            print(f"{name:10} {run:9} {batch:5d} {r.stationary:16.5g} {r.stationary_se:8.2g} {r.stationary / ref:12.3f}")
        print(f"  ({time.perf_counter() - t0:.1f} s)")
    plot(results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
