"""A problem with known gradient noise scale, for the noise-scale tests (plain torch, DDP, DeepSpeed)."""

from __future__ import annotations

import math

import torch

DIM = 512
TRUE_B_NOISE = 24.0
STEPS = 400  # optimizer steps per estimate: the EMA then lands within a few % of TRUE_B_NOISE


class Quadratic(torch.nn.Module):
    """Per-sample loss 1/2 |theta - x|^2, x ~ N(0, diag(s^2)): per-sample gradient theta - x, so
    G = theta and Sigma = diag(s^2) exactly; theta is set so that tr(Sigma) / |G|^2 = TRUE_B_NOISE.
    Shapes: theta (DIM,), samples (n, DIM)."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.s = torch.linspace(0.5, 1.5, DIM, dtype=dtype)
        self.theta = torch.nn.Parameter(torch.full((DIM,), math.sqrt(self.trace / TRUE_B_NOISE / DIM), dtype=dtype))

    @property
    def trace(self) -> float:
        """tr(Sigma), the sum of the per-sample gradient variances."""
        return float(self.s.double().square().sum())

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(n, DIM, generator=gen, dtype=self.s.dtype) * self.s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.theta - x).square().sum(dim=1).mean()
