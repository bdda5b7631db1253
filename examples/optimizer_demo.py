"""Fit a small MLP to a noisy sine with each bigbatch optimizer and torch's AdamW.

    python examples/optimizer_demo.py [--steps 400]

Prints the final training loss of each; a minimal example of the optimizer API.
"""

import argparse

import torch

from bigbatch.optim import AdaBound, AMSBound, RAdam


def fit(make_opt, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.linspace(-3, 3, 1024).unsqueeze(1)
    y = torch.sin(2 * x) + 0.05 * torch.randn(x.shape, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = make_opt(model.parameters())
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    return torch.nn.functional.mse_loss(model(x), y).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    candidates = {
        "AdaBound": lambda ps: AdaBound(ps, lr=1e-2, final_lr=0.1),
        "AMSBound": lambda ps: AMSBound(ps, lr=1e-2, final_lr=0.1),
        "RAdam": lambda ps: RAdam(ps, lr=1e-2),
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    }
    for name, make in candidates.items():
        print(f"{name:<12} final MSE {fit(make, args.steps):.4f}")


if __name__ == "__main__":
    main()
