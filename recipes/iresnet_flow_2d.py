"""A residual flow on a 2-D density: invertible residual blocks with certified contraction.

    python recipes/iresnet_flow_2d.py [--data moons|rings] [--blocks 8] [--steps 1500] [--plot flow.png]

Each block is y = x + g(x), g a small MLP that `lipfx.invertible.InvertibleResidual` converts and
normalizes so that its certificate stays <= coeff (0.9) while training. The flow maps data to a
standard normal; it is trained by maximum likelihood with log|det| from the unbiased
Russian-roulette estimator (Residual Flows), and evaluated with the exact log-determinant (2x2
Jacobians). Samples come from the certified inverse. The recipe prints the test negative
log-likelihood, each block's certified contraction, the worst inverse reconstruction error with
its certified bound, and saves a plot of the data, the learned density and samples.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from lipfx.invertible import InvertibleResidual, InvertibleSequential


def two_moons(n: int, gen: torch.Generator, noise: float = 0.08) -> torch.Tensor:
    t = math.pi * torch.rand(n, generator=gen)
    upper = torch.rand(n, generator=gen) < 0.5
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.6
    return pts + noise * torch.randn(n, 2, generator=gen)


def rings(n: int, gen: torch.Generator, noise: float = 0.06) -> torch.Tensor:
    radius = torch.where(torch.rand(n, generator=gen) < 0.5, 0.8, 1.8)
    t = 2 * math.pi * torch.rand(n, generator=gen)
    return torch.stack([radius * torch.cos(t), radius * torch.sin(t)], dim=1) + noise * torch.randn(n, 2, generator=gen)


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(2, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, 2))


def log_normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.square().sum(1) - math.log(2 * math.pi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["moons", "rings"], default="moons")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--coeff", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="flow_2d.png")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    sample = two_moons if args.data == "moons" else rings
    test = sample(4000, gen)
    example = torch.zeros(1, 2)
    flow = InvertibleSequential(*[InvertibleResidual(mlp(args.hidden), args.coeff, example) for _ in range(args.blocks)])
    opt = torch.optim.Adam(flow.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)

    start = time.perf_counter()
    flow.train()
    for step in range(1, args.steps + 1):
        x = sample(args.batch, gen)
        # p < 1 - coeff^2 keeps the estimator's variance finite (Chen et al. 2019)
        z, logdet = flow.forward_and_logdet(x, "roulette", n_exact=3, p=0.15, generator=gen)
        loss = -(log_normal(z) + logdet).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, args.steps // 5) == 0 or step == 1:
            print(f"step {step:5d}  train NLL (roulette estimate) {loss.item():.3f}")
    train_time = time.perf_counter() - start

    flow.eval()
    with torch.no_grad():
        z, logdet = flow.forward_and_logdet(test, "exact")
    nll = -(log_normal(z) + logdet).mean().item()
    gauss = torch.distributions.MultivariateNormal(test.mean(0), torch.cov(test.T))
    baseline = -gauss.log_prob(test).mean().item()
    print(f"\ntest NLL (exact log-det): {nll:.3f} nats   (best Gaussian: {baseline:.3f})   training {train_time:.0f} s")

    print("certified contraction per block (coeff {:.2f}): {}".format(
        args.coeff, " ".join(f"{b.contraction():.3f}" for b in flow)))
    print(f"flow Lipschitz <= {flow.lipschitz():.3g}, inverse Lipschitz <= {flow.inverse_lipschitz():.3g}")

    with torch.no_grad():
        y = flow(test)
    info = flow.inverse_with_info(y, tol=1e-4)
    err = (info.x - test).norm(dim=1)
    # the bound is on the distance to the exact preimage of y; the original point differs from
    # it only by the forward pass's float32 rounding
    print(f"inverse of {len(test)} test points (tol 1e-4): certified error bound <= {info.error_bound.max().item():.2e} "
          f"for every point (converged: {bool(info.converged.all())}); distance to the original points <= "
          f"{err.max().item():.2e}; fixed-point iterations per point, all blocks: {info.iterations.double().mean().item():.0f}")

    samples = flow.inverse(torch.randn(2000, 2, generator=gen), tol=1e-4)
    _plot(args.plot, flow, test, samples)


def _plot(path: str, flow: InvertibleSequential, data: torch.Tensor, samples: torch.Tensor) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed")
        return
    lim = float(data.abs().max()) * 1.2
    grid = torch.linspace(-lim, lim, 120)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    with torch.no_grad():
        z, logdet = flow.forward_and_logdet(pts, "exact")
    density = (log_normal(z) + logdet).exp().reshape(xx.shape)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].scatter(*data[:2000].T, s=2)
    axes[0].set_title("data")
    axes[1].imshow(density, extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis")
    axes[1].set_title("learned density")
    axes[2].scatter(*samples.T, s=2, color="tab:orange")
    axes[2].set_title("samples (certified inverse)")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
