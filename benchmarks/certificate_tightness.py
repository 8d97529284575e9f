"""Certificate tightness and speed.

For a few small networks (random, and trained for a few steps on data made in code) prints
certificate / empirical lower bound, with and without bounding linear subgraphs as one operator;
the separable-pair example of issue 5; and the time to certify resnet50 at 224x224.

    python benchmarks/certificate_tightness.py [--skip-resnet50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import lipfx
from lipfx.norms import operator_norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from empirical import empirical_lipschitz  # noqa: E402


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def linear_stack() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def train_briefly(net: nn.Module, steps: int = 200) -> nn.Module:
    """A few SGD steps on images whose labels come from a fixed random teacher."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(3 * 16 * 16, 10, generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(64, 3, 16, 16, generator=gen)
        y = (x.flatten(1) @ teacher).argmax(1)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def tightness_rows() -> list[str]:
    rows = []
    torch.manual_seed(0)
    cases = [
        ("small CNN, random", small_cnn()),
        ("small CNN, trained", train_briefly(small_cnn())),
        ("small CNN, converted (separable)", None),
        ("linear conv/pool/linear, random", linear_stack()),
    ]
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    for name, net in cases:
        if net is None:
            net = lipfx.convert(train_briefly(small_cnn()), torch.zeros(1, 3, 16, 16), normalize=False)
        net = net.double().eval()
        composed = lipfx.certificate(net, x).bound
        parts = lipfx.certificate(net, x, compose_linear=False).bound
        lower = empirical_lipschitz(net, (1, 3, 16, 16), starts=3, iters=40, ascent=60)
        rows.append(f"| {name} | {lower:.4g} | {composed:.4g} ({composed / lower:.2f}x) | {parts:.4g} ({parts / lower:.2f}x) |")
    return rows


def separable_pair() -> str:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).double()
    x = torch.zeros(1, 64, 32, 32, dtype=torch.float64)
    net = lipfx.convert(nn.Sequential(conv), x, normalize=False)
    rec = lipfx.certificate(net, x).records[-2]
    true = operator_norm(conv, x.shape, iters=2000)
    return (f"| 64x64x3x3 conv at 32x32, exact separable pair | {true:.5g} | {rec.bound:.5g} "
            f"(+{100 * (rec.bound / true - 1):.2f}%) | {rec.product:.5g} ({rec.product / true:.2f}x) |")


def resnet50_time() -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    rows = []
    for label, net in (("resnet50 (BatchNorm kept)", model), ("resnet50 converted", lipfx.convert(model, x, normalize=False))):
        start = time.perf_counter()
        cert = lipfx.certificate(net, x)
        rows.append(f"| {label} at 224x224 | {time.perf_counter() - start:.1f} s | {cert.bound:.4g} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-resnet50", action="store_true")
    args = parser.parse_args()
    print("| network (float64, input 3x16x16) | empirical lower bound | certificate (ratio) | without composition (ratio) |")
    print("|---|---|---|---|")
    for row in tightness_rows():
        print(row, flush=True)
    print()
    print("| case | true norm | composed bound | product of the parts |")
    print("|---|---|---|---|")
    print(separable_pair(), flush=True)
    if not args.skip_resnet50:
        print()
        print("| model | time to certify | bound |")
        print("|---|---|---|")
        for row in resnet50_time():
            print(row, flush=True)


if __name__ == "__main__":
    main()
