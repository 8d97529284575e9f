"""log|det(I + J_g(x))| of a residual block: the power series with Hutchinson's trace estimator
(truncated, or Russian roulette as in Residual Flows, Chen et al. 2019, with the Neumann-series
gradient), and the exact slogdet of the dense Jacobian for small inputs."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import ArgumentError

LOGDET_METHODS = ("series", "roulette", "exact")
GRADIENTS = ("neumann", "backprop")
EXACT_MAX_DIM = 4096  # dense Jacobians beyond this are slow and memory-hungry: use an estimator


def check_options(method: str, gradient: str) -> None:
    if method not in LOGDET_METHODS:
        raise ArgumentError(f"unknown logdet method {method!r}; choose from {LOGDET_METHODS}")
    if gradient not in GRADIENTS:
        raise ArgumentError(f"unknown gradient {gradient!r}; choose 'neumann' or 'backprop'")


def series_logdet(branch: nn.Module, x: torch.Tensor, method: str, *, n_terms: int, n_exact: int, p: float,
                  n_samples: int, gradient: str, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + g(x), estimate)`` by the truncated (``"series"``) or Russian-roulette series."""
    coefs = coefficients(method, n_terms, n_exact, p, x.device, generator)
    want_graph = torch.is_grad_enabled()
    backprop = want_graph and gradient == "backprop"
    with torch.enable_grad():
        xi = x if x.requires_grad else x.detach().requires_grad_(True)
        gx = branch(xi)
        estimate = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        surrogate = torch.zeros_like(estimate)
        for _ in range(n_samples):
            v = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            w, neumann = v, torch.zeros_like(v)
            for k, coef in enumerate(coefs, start=1):
                sign = 1.0 if k % 2 else -1.0
                neumann = neumann + (sign * coef) * w  # weight of tr(J^(k-1) dJ) in d(term k)
                w = torch.autograd.grad(gx, xi, w, retain_graph=True, create_graph=backprop)[0]
                estimate = estimate + (sign * coef / k) * _dot(w, v)
            if want_graph and gradient == "neumann":
                # with u fixed, d(u^T J v) = u^T dJ v: the Neumann-series gradient of logdet
                uj = torch.autograd.grad(gx, xi, neumann, retain_graph=True, create_graph=True)[0]
                surrogate = surrogate + _dot(uj, v)
        if want_graph and gradient == "neumann":
            estimate = estimate.detach() + (surrogate - surrogate.detach())
        estimate = estimate / n_samples
    y = x + (gx if want_graph else gx.detach())
    return y, (estimate if want_graph else estimate.detach())


def exact_logdet(branch: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + g(x), slogdet(I + J_g(x)))`` from the dense Jacobian of every sample."""
    sample_shape = tuple(x.shape[1:])
    d = math.prod(sample_shape)
    if d > EXACT_MAX_DIM:
        raise ArgumentError(f"exact logdet needs a dense {d}x{d} Jacobian per sample; use method='series' or 'roulette'")
    batch = x.shape[0]
    want_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xi = x if x.requires_grad else x.detach().requires_grad_(True)
        gx = branch(xi)
        # samples are independent: row i of every sample's Jacobian in one vjp on the batch sum
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        rows = [torch.autograd.grad(gx, xi, e.reshape(sample_shape).expand_as(gx), retain_graph=True,
                                    create_graph=want_graph)[0].reshape(batch, d) for e in eye]
    jac = torch.stack(rows, dim=1)  # (batch, out, in)
    logdet = torch.linalg.slogdet(eye + jac).logabsdet
    if not want_graph:
        return x + gx.detach(), logdet.detach()
    return x + gx, logdet


def coefficients(method: str, n_terms: int, n_exact: int, p: float, device: torch.device,
                 generator: Optional[torch.Generator]) -> list[float]:
    """Weights of the series terms k = 1, 2, ...: all 1 (truncated), or 1 / P(N >= k)."""
    if method == "series":
        if n_terms < 1:
            raise ArgumentError(f"n_terms must be >= 1, got {n_terms}")
        return [1.0] * n_terms
    if not 0 < p < 1:
        raise ArgumentError(f"p must be in (0, 1), got {p}")
    if n_exact < 1:
        raise ArgumentError(f"n_exact must be >= 1, got {n_exact}")
    # M ~ Geometric(p) on {0, 1, ...}: P(M >= m) = (1 - p)^m, N = n_exact + M
    u = torch.rand((), generator=generator, device=device if generator is not None else None).item()
    extra = int(math.floor(math.log1p(-u) / math.log1p(-p))) if u > 0 else 0
    return [1.0] * n_exact + [(1 - p) ** -m for m in range(1, extra + 1)]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(dim=1)
