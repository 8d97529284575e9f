"""Does a margin schedule help certified training? Variants of the loss on the benchmark's setting.

    pip install -e ".[bench]"
    python benchmarks/margin_schedule.py [--epochs 30] [--seeds 3]

The network, data, optimizer, schedule and learning rate (0.01, the rate certified_training.py
picks for both configurations) are those of ``benchmarks/certified_training.py`` on
scikit-learn's digits; only the loss changes:

- "fixed": ``margin_loss`` with L = 1 at radius 0.5 throughout (the benchmark's loss);
- "ramp": the radius grows linearly from 0 to 0.5 over the first 30% of the steps, then stays;
- "pairwise": the margin of class j is 0.5 ||w_t - w_j|| (the last layer's unit rows in training
  mode, features taken 1-Lipschitz), the constant the pairwise radii certify with, instead of
  sqrt(2) x 0.5 for every j;
- "pairwise + ramp": both.

Columns: clean and certified accuracy (lipfx.robust.certified_radius, pairwise) at three radii,
means over the seeds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import certified_training as bench
from lipfx.robust import margin_loss

RAMP = 0.3  # fraction of the steps over which the radius grows


def last_rows(net: nn.Module) -> torch.Tensor:
    """The training-mode weight of the network's last linear layer (unit rows)."""
    return [m for m in net.modules() if isinstance(m, nn.Linear)][-1].weight


def loss(ramp: bool, pairwise: bool) -> bench.Loss:
    def fn(net: nn.Module, logits: torch.Tensor, y: torch.Tensor, progress: float) -> torch.Tensor:
        radius = bench.TRAIN_RADIUS * (min(1.0, progress / RAMP) if ramp else 1.0)
        if pairwise:
            w = last_rows(net)
            lipschitz = torch.cdist(w, w)
        else:
            lipschitz = 1.0
        return margin_loss(logits, y, radius=radius, lipschitz=lipschitz, temperature=bench.TEMPERATURE)
    return fn


VARIANTS = {"fixed": loss(False, False), "ramp": loss(True, False), "pairwise": loss(False, True),
            "pairwise + ramp": loss(True, True)}
CONFIGS = ("lipfx convs whole (spectral)", "lipfx convs whole (orthogonal, BCOP)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args()
    data = bench.digits()
    x, y = data["test"]
    methods = bench.methods(args.width)
    print(f"digits, width {args.width}, {args.epochs} epochs, lr 0.01, {args.seeds} seeds\n")
    print("| configuration | loss | clean | " + " | ".join(f"cert@{r}" for r in bench.RADII) + " |")
    print("|---|---|---|" + "---|" * len(bench.RADII))
    for config in CONFIGS:
        make, _ = methods[config]
        for name, fn in VARIANTS.items():
            rows = []
            for seed in range(args.seeds):
                net, _, finite = bench.train(make, data, 1e-2, args.epochs, seed, loss_fn=fn)
                if not finite:
                    continue
                radius, _ = bench.radii(net, x, y)
                with torch.no_grad():
                    clean = float((net(x).argmax(1) == y).float().mean())
                rows.append([clean] + [float((radius >= r).float().mean()) for r in bench.RADII])
            cells = [f"{statistics.fmean(col):.3f}" for col in zip(*rows)] if rows else ["nan"] * 4
            print(f"| {config} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
