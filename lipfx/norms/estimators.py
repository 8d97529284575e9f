"""Norm *estimates* (from below). For training-time normalisation and as test references only:
power iteration converges from below, so nothing here may feed a certificate."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch


class PowerIterationResult(NamedTuple):
    sigma: torch.Tensor  # estimate of the largest singular value (a lower bound up to round-off)
    v: torch.Tensor  # unit right singular vector estimate, the warm start for the next call
    iterations: int


@torch.no_grad()
def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(v.dtype).tiny)


def power_iteration(
    matrix: torch.Tensor,
    v: Optional[torch.Tensor] = None,
    eps: float = 0.01,
    max_iter: int = 100,
) -> PowerIterationResult:
    """Warm-started power iteration on a small matrix (Runkel et al. sec. 3.2).

    Iterates v <- A^T A v / ||A^T A v|| until ||A^T A v - sigma^2 v|| < eps (the paper's absolute
    stopping rule), from ``v`` (length = columns of ``matrix``) or a fixed random start. The state
    is that one vector. ``matrix`` is flattened to 2-D (Cout x rest), as for a 1x1 conv weight.
    The returned sigma is computed from ``matrix`` itself so gradients flow through it.
    """
    a = matrix.reshape(matrix.shape[0], -1)
    if v is None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(a.shape[1], generator=gen, dtype=a.dtype).to(a.device)
    res = grouped_power_iteration(a.unsqueeze(0), v.unsqueeze(0), eps, max_iter, relative=False)
    return PowerIterationResult(res.sigma[0], res.v[0], res.iterations)


def operator_norm(
    fn: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int],
    iters: int = 500,
    tol: float = 1e-10,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    device: Optional[torch.device | str] = None,
) -> float:
    """Largest singular value of a *linear* function, by power iteration on the real operator.

    Uses autograd for the adjoint (A^T u = grad of <fn(x), u>), so any linear module or
    function works. ``fn`` must be linear (subtract fn(0) first for affine maps). Converges from
    below: this is the reference that tests compare bounds with, never a bound itself.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(input_shape), generator=gen, dtype=dtype).to(device)
    x = x / torch.linalg.vector_norm(x)
    sigma = 0.0
    for _ in range(iters):
        x = x.detach().requires_grad_(True)
        y = fn(x)
        (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())  # A^T A x
        new_sigma = float(torch.sqrt(torch.dot(x.detach().flatten(), g.flatten()).clamp_min(0)))
        x = _normalize(g.detach())
        if abs(new_sigma - sigma) <= tol * max(new_sigma, 1e-300):
            sigma = new_sigma
            break
        sigma = new_sigma
    return sigma


class PowerSteps(NamedTuple):
    """Where :func:`power_steps` stopped, per group."""

    sigma: torch.Tensor  # (G,) ||A v||: an estimate from below
    u: torch.Tensor  # (G, m) A v / sigma
    v: torch.Tensor  # (G, n) the unit vector sigma and u belong to (d sigma / dA = u v^T)
    next: torch.Tensor  # (G, n) the following iterate: the warm start for the next call
    residual: torch.Tensor  # (G,) ||A^T A v - sigma^2 v||, relative to sigma^2 unless relative=False
    iterations: int


@torch.no_grad()
def power_steps(matrices: torch.Tensor, v: torch.Tensor, eps: Optional[float] = 0.01, max_iter: int = 100,
                relative: bool = True) -> PowerSteps:
    """Warm-started power iteration on a batch of matrices (G, m, n) from vectors ``v`` (G, n),
    without autograd, until every group's residual ||A^T A v - sigma^2 v|| is below ``eps`` --
    relative to sigma^2 by default (the paper's rule made scale-free, so it means the same before
    and after normalization), absolute with ``relative=False`` (the paper's rule as written).

    ``eps=None`` runs exactly ``max_iter`` steps (:func:`fixed_power_steps`) and never reads a
    value on the host: what a training step uses, so that it neither waits for the device nor
    breaks a compiled graph.
    """
    a = matrices.detach()
    v = _normalize_rows(v.to(a.dtype))  # a new tensor: the caller's state is not aliased
    tiny = torch.finfo(a.dtype).tiny
    if eps is None and relative:
        return fixed_power_steps(a, v, max_iter)
    for it in range(1, max_iter + 1):
        x = torch.bmm(a, v.unsqueeze(-1)).squeeze(-1)
        sigma = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        u = x / sigma.clamp_min(tiny)
        y = torch.bmm(u.unsqueeze(1), a).squeeze(1)  # A^T u, so sigma (y - sigma v) is the residual
        residual = sigma * torch.linalg.vector_norm(y - sigma * v, dim=-1, keepdim=True)
        if relative:
            residual = residual / sigma.square().clamp_min(tiny)
        norm_y = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        nxt = torch.where(norm_y > 0, y / norm_y.clamp_min(tiny), v)  # a zero group keeps its vector
        if it == max_iter or (eps is not None and bool((residual <= eps if relative else residual < eps).all())):
            break
        v = nxt
    return PowerSteps(sigma.squeeze(-1), u, v, nxt, residual.squeeze(-1), it)


WARM_MIX = 2.0 ** -12  # the share of a fixed generic vector in every warm start (see generic_vector)


def generic_vector(n: int, dtype: torch.dtype, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """A fixed unit vector of length ``n`` with no zero component (sines of golden-angle steps).

    Warm-started power steps add ``WARM_MIX`` of it to their start. A start that lies in an
    invariant subspace of A^T A missing the top singular vector (an exact lower singular vector
    of a block-diagonal weight, kept there by gradients that never leave the block) would stay
    there forever, and so would the estimate: the mixed-in share gives the top direction a part
    that the steps then amplify by (sigma_1 / sigma_2)^2 each (docs/math.md 5.2). Made on the
    device (no host copy)."""
    i = torch.arange(n, dtype=torch.float32, device=device)
    r = torch.sin(1.0 + 2.399963229728653 * i)
    return (r / torch.linalg.vector_norm(r)).to(dtype)


def _mixed_starts(vectors: Sequence[torch.Tensor], mix: Sequence[torch.Tensor], dtype: torch.dtype) -> list:
    """Unit vectors along v + WARM_MIX * r: new tensors, never the caller's state."""
    w = torch._foreach_add([v.to(dtype) for v in vectors], [r.to(dtype) for r in mix], alpha=WARM_MIX)
    norms = torch._foreach_norm(w)
    torch._foreach_clamp_min_(norms, torch.finfo(dtype).tiny)
    return list(torch._foreach_div(w, norms))


@torch.no_grad()
def fixed_power_steps(a: torch.Tensor, v: torch.Tensor, steps: int, mix: Optional[torch.Tensor] = None) -> PowerSteps:
    """Exactly ``steps`` power steps on (G, m, n) from unit vectors ``v`` (G, n), with the relative
    residual of the last one, in as few kernels as the iteration allows (a training step runs
    this for every layer): the first steps only set a direction, and one guard at the end keeps
    the starting vector of a zero group instead of collapsing it to 0. ``mix`` (n,): a
    :func:`generic_vector` added to every start with weight ``WARM_MIX``."""
    tiny = torch.finfo(a.dtype).tiny
    # a copy: with one step w is returned as the gradient's factor, and the caller then
    # overwrites its state with the next vector (the gradient would use that one)
    if mix is None:
        start = w = v.to(a.dtype, copy=True)
    else:
        w = v.to(a.dtype) + WARM_MIX * mix.to(a.dtype)
        start = w = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(tiny)
    for _ in range(steps - 1):
        x = torch.bmm(a, w.unsqueeze(-1))
        x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True).clamp_min(tiny)  # A^T A w would be ~sigma^2: it underflows first
        y = torch.bmm(x.mT, a).squeeze(1)
        w = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(tiny)
    x = torch.bmm(a, w.unsqueeze(-1)).squeeze(-1)
    sigma = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    safe = sigma.clamp_min(tiny)
    u = x / safe
    y = torch.bmm(u.unsqueeze(1), a).squeeze(1)  # A^T u: sigma ||y - sigma w|| is the residual
    residual = torch.linalg.vector_norm(y - sigma * w, dim=-1, keepdim=True) / safe  # relative to sigma^2
    norm_y = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    nxt = torch.where(norm_y > 0, y / norm_y.clamp_min(tiny), start)
    return PowerSteps(sigma.squeeze(-1), u, w, nxt, residual.squeeze(-1), steps)


class PowerStepsList(NamedTuple):
    """:class:`PowerSteps` of many single matrices at once: each field a list, one per matrix."""

    sigma: list  # 0-d ||A v||: an estimate from below
    u: list  # (m,) A v / sigma
    v: list  # (n,) the unit vector sigma and u belong to
    next: list  # (n,) the following iterate: the warm start for the next call
    residual: list  # 0-d ||A^T A v - sigma^2 v|| / sigma^2


@torch.no_grad()
def fixed_power_steps_list(matrices: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor], steps: int,
                           mix: Optional[Sequence[torch.Tensor]] = None) -> PowerStepsList:
    """:func:`fixed_power_steps` on many matrices of different shapes (each (m, n), with its unit
    vector (n,) and optionally its ``mix`` vector): the same iteration, with every vector
    operation one ``torch._foreach_*`` call over all of them, so a training step of a network
    with many pointwise layers costs two matrix-vector products per matrix and step plus a few
    dozen kernels in all, not per layer. The matrices share one dtype."""
    a = list(matrices)
    tiny = torch.finfo(a[0].dtype).tiny
    # never the caller's state (see fixed_power_steps)
    start = w = ([v.to(m.dtype, copy=True) for m, v in zip(a, vectors)] if mix is None
                 else _mixed_starts(vectors, mix, a[0].dtype))
    for _ in range(steps - 1):
        x = [torch.mv(m, wi) for m, wi in zip(a, w)]
        norms = torch._foreach_norm(x)
        torch._foreach_clamp_min_(norms, tiny)
        y = [torch.mv(m.T, xi) for m, xi in zip(a, torch._foreach_div(x, norms))]  # A^T (A w / ||A w||): no underflow
        norms = torch._foreach_norm(y)
        torch._foreach_clamp_min_(norms, tiny)
        w = torch._foreach_div(y, norms)
    x = [torch.mv(m, wi) for m, wi in zip(a, w)]
    sigma = torch._foreach_norm(x)
    safe = torch._foreach_clamp_min(sigma, tiny)
    u = torch._foreach_div(x, safe)
    y = [torch.mv(m.T, ui) for m, ui in zip(a, u)]  # A^T u: sigma ||y - sigma w|| is the residual
    residual = torch._foreach_div(torch._foreach_norm(torch._foreach_sub(y, torch._foreach_mul(w, sigma))), safe)
    norm_y = torch._foreach_norm(y)
    unit = torch._foreach_div(y, torch._foreach_clamp_min(norm_y, tiny))
    nxt = [torch.where(n > 0, yi, s) for n, yi, s in zip(norm_y, unit, start)]  # a zero matrix keeps its vector
    return PowerStepsList(sigma, u, w, nxt, residual)


def grouped_power_iteration(
    matrices: torch.Tensor,
    v: torch.Tensor,
    eps: float = 0.01,
    max_iter: int = 100,
    relative: bool = True,
) -> PowerIterationResult:
    """:func:`power_steps`, then sigma = ||A v|| per group at the last iterate, with gradients
    flowing into ``matrices`` (one matrix per group of a grouped layer)."""
    steps = power_steps(matrices, v, eps, max_iter, relative)
    sigma = torch.linalg.vector_norm((matrices @ steps.next.unsqueeze(-1)).squeeze(-1), dim=-1)
    return PowerIterationResult(sigma, steps.next, steps.iterations)


@torch.no_grad()
def _normalize_rows(v: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v / norm.clamp_min(torch.finfo(v.dtype).tiny)
