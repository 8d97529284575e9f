"""Empirical *lower* bounds on a network's Lipschitz constant: what a certificate must exceed."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def jacobian_norm(f: Callable, x: torch.Tensor, iters: int = 30, seed: int = 0) -> float:
    """Largest ||J(x) v|| / ||v||, by power iteration on J^T J (forward- and reverse-mode AD)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        _, jv = torch.func.jvp(f, (x,), (v,))
        sigma = max(sigma, float(jv.norm()))
        _, pullback = torch.func.vjp(f, x)
        (g,) = pullback(jv)
        if float(g.norm()) == 0.0:
            break
        v = g / g.norm()
    return sigma


def secant_ascent(f: Callable, shape: Sequence[int], steps: int = 40, seed: int = 0, dtype=torch.float64) -> float:
    """max ||f(x + d) - f(x)|| / ||d|| found by gradient ascent on (x, d)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen, dtype=dtype).requires_grad_(True)
    d = (1e-2 * torch.randn(tuple(shape), generator=gen, dtype=dtype)).requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=0.05)
    best = 0.0
    for _ in range(steps):
        ratio = (f(x + d) - f(x)).norm() / d.norm()
        best = max(best, float(ratio))
        opt.zero_grad()
        (-ratio).backward()
        opt.step()
    return best


def empirical_lipschitz(f: Callable, shape: Sequence[int], starts: int = 3, iters: int = 30, ascent: int = 40,
                        dtype=torch.float64) -> float:
    """The largest lower bound found: Jacobian norms at several inputs and secant ascent."""
    best = 0.0
    for s in range(starts):
        gen = torch.Generator().manual_seed(100 + s)
        x = torch.randn(tuple(shape), generator=gen, dtype=dtype)
        best = max(best, jacobian_norm(f, x, iters, seed=s))
        if ascent:
            best = max(best, secant_ascent(f, shape, ascent, seed=s, dtype=dtype))
    return best
