"""Orthogonal parametrizations side by side: lipfx's (a Cayley map around an orthogonal base)
against torch.nn.utils.parametrizations.orthogonal (matrix_exp and cayley) on one linear layer.

    python benchmarks/orthogonal_speed.py [--repeats 50]

For each shape: milliseconds per forward + backward of the layer's weight (batch 256 through the
layer, SGD step), and how orthogonal the weight is after 100 Adam steps at lr 1e-2:
max |sigma_i - 1| by dense SVD. Same shapes, seed and steps for every method.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from lipfx.normalization.orthogonal import OrthogonalNormalization

SHAPES = ((64, 64), (256, 256), (512, 128), (128, 512))


def make(method: str, out_f: int, in_f: int) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    if method == "lipfx":
        parametrize.register_parametrization(layer, "weight", OrthogonalNormalization(layer.weight, 1, 1.0))
    else:
        parametrizations.orthogonal(layer, orthogonal_map=method)
    return layer


def step_ms(layer: nn.Linear, repeats: int) -> float:
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(256, layer.in_features)

    def step():
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return 1e3 * (time.perf_counter() - start) / repeats


def defect_after_training(layer: nn.Linear) -> float:
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    target = torch.randn(layer.out_features, generator=g)
    for _ in range(100):
        loss = (layer(torch.randn(64, layer.in_features, generator=g)) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        s = torch.linalg.svdvals(layer.weight.double())
    return float((s - 1).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    methods = ("lipfx", "matrix_exp", "cayley")
    print("| shape | " + " | ".join(f"{m} ms/step" for m in methods) + " | " + " | ".join(f"{m} max|s-1|" for m in methods) + " |")
    print("|---|" + "---|" * (2 * len(methods)))
    for out_f, in_f in SHAPES:
        times = [step_ms(make(m, out_f, in_f), args.repeats) for m in methods]
        defects = [defect_after_training(make(m, out_f, in_f)) for m in methods]
        print(f"| {out_f}x{in_f} | " + " | ".join(f"{t:.2f}" for t in times) + " | "
              + " | ".join(f"{d:.1e}" for d in defects) + " |", flush=True)


if __name__ == "__main__":
    main()
