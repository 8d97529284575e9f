"""MaxMin side by side: lipfx's (a custom backward routed by a 0/1 mask) against the plain torch
expression (torch.maximum / torch.minimum, autograd's own backward) and the peers' MaxMin.

    python benchmarks/activation_speed.py [--repeats 200]

For each shape: microseconds per forward + backward (the gradient of a fixed random projection
of the output), best of 5 interleaved rounds, and each method's ratio to lipfx's. The plain
expression is first checked to give lipfx's output and (no ties in random data) its gradient
exactly; the peers pair channels in their own order, so only their speed is compared.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from lipfx.activations import MaxMin

SHAPES = ((64, 32, 8, 8), (64, 64, 4, 4), (256, 256), (32, 64, 32, 32))


def plain(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), 1)


def methods() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    out = {"lipfx MaxMin": MaxMin(dim=1), "torch.maximum/minimum": plain}
    try:
        from orthogonium.layers import MaxMin as OrthoMaxMin

        out["orthogonium MaxMin"] = OrthoMaxMin()
    except ImportError:
        pass
    try:
        from deel.torchlip import GroupSort2

        out["deel-torchlip GroupSort2"] = GroupSort2()
    except ImportError:
        pass
    return out


def us_per_step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, up: torch.Tensor, repeats: int) -> float:
    for _ in range(5):
        fn(x).backward(up)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x).backward(up)
    return 1e6 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    chosen = methods()
    print("| shape | " + " | ".join(f"{m} us" for m in chosen) + " | " + " | ".join(f"{m} / lipfx" for m in chosen if m != "lipfx MaxMin") + " |")
    print("|" + "---|" * (2 * len(chosen)))
    for shape in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).requires_grad_(True)
        up = torch.randn(shape, generator=g)
        ref, want = chosen["lipfx MaxMin"](x), plain(x)
        assert torch.equal(ref, want)
        assert torch.equal(torch.autograd.grad(ref, x, up)[0], torch.autograd.grad(want, x, up)[0])
        best = {name: float("inf") for name in chosen}
        for _ in range(5):
            for name, fn in chosen.items():
                best[name] = min(best[name], us_per_step(fn, x, up, args.repeats))
        lip = best["lipfx MaxMin"]
        cells = [f"{best[m]:.0f}" for m in chosen] + [f"{best[m] / lip:.2f}" for m in chosen if m != "lipfx MaxMin"]
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
