"""Reproduce Runkel et al. Fig. 2: relative overestimation of depthwise 3x3 Gaussian kernels.

For each resolution, random N(0,1) 3x3 kernels; true norm by dense SVD of the explicit operator
(N <= 32) or long float64 power iteration (larger N). Prints median and interquartile range of
bound/true - 1 for the paper's bound and lipfx's default, at stride 1 and stride 2, writes
docs/bound_accuracy.png.

    python benchmarks/bound_accuracy.py [--samples 100] [--out docs/bound_accuracy.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from reference import dense_norm  # noqa: E402

from lipfx.norms import layer_bound, operator_norm  # noqa: E402

RESOLUTIONS = [7, 8, 14, 16, 28, 32, 64, 128]


def true_norm(conv: nn.Module, n: int) -> float:
    if n <= 32:
        return dense_norm(conv, (1, n, n))
    return operator_norm(lambda x: conv(x.unsqueeze(0)), (1, n, n), iters=4000, tol=1e-14)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--out", default="docs/bound_accuracy.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{'N':>4} {'stride':>6} {'method':>8} {'median':>8} {'q25':>8} {'q75':>8}")
    for stride in (1, 2):
        for n in RESOLUTIONS:
            samples = args.samples if n <= 32 else max(10, args.samples // 5)
            over = {"paper": [], "lipfx": []}
            for _ in range(samples):
                conv = nn.Conv2d(1, 1, 3, padding=1, stride=stride, bias=False).double()
                nn.init.normal_(conv.weight)
                true = true_norm(conv, n)
                over["paper"].append(layer_bound(conv, (1, n, n), method="paper") / true - 1)
                over["lipfx"].append(layer_bound(conv, (1, n, n)) / true - 1)
            for method, values in over.items():
                q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
                rows.append((n, stride, method, *(100 * float(v) for v in q)))
                r = rows[-1]
                print(f"{n:>4} {stride:>6} {method:>8} {r[4]:7.2f}% {r[3]:7.2f}% {r[5]:7.2f}%", flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install lipfx[plot]): no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, stride in zip(axes, (1, 2)):
        for method, color in (("paper", "tab:red"), ("lipfx", "tab:blue")):
            sel = [r for r in rows if r[1] == stride and r[2] == method]
            ns = [r[0] for r in sel]
            ax.plot(ns, [r[4] for r in sel], "o-", color=color, label=f"{method} (median)")
            ax.fill_between(ns, [r[3] for r in sel], [r[5] for r in sel], color=color, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("resolution N")
        ax.set_title(f"3x3 Gaussian depthwise, stride {stride}")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("overestimation (%)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
