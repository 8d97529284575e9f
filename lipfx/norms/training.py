"""Differentiable conv-norm bounds for training-time normalization (MATH sections 1-3).

The certificate path (:mod:`lipfx.norms.conv`) works in float64 without gradients and proves
its results. During training the normalized weight is ``W * K / bound(W)`` and the bound must
carry gradients, so this module evaluates the same circulant-embedding bound with autograd, in
the weight's dtype, on the smallest grid that embeds the conv. The result is still an upper bound
on the layer's norm (up to float round-off), never an estimate from below.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from .conv import zero_padded_grid
from .geometry import ConvGeometry, padding_norm
from .spectral import phase_stack, transfer_matrices


class Peak(NamedTuple):
    """Where a conv's FFT bound is attained: group, frequency index on the (sub)grid, and the
    padding-operator factor that multiplies it."""

    group: int
    freq: tuple[int, ...]
    factor: float
    value: float  # the bound itself: ||P|| * the block's 2-norm


def _stacked(geom: ConvGeometry, n: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...], float]:
    """Phase-stacked kernel (groups, Cout_g, Cin_g * P, *taps), its grid, and ||P||.

    Non-zero padding modes are bounded as ||P|| times the valid conv on the padded input, as in
    :func:`conv.conv_bound`.
    """
    factor = 1.0
    if geom.padding_mode != "zeros":
        factor = padding_norm(geom.padding_mode, n, geom.pads)
        n = tuple(ni + lo + hi for ni, (lo, hi) in zip(n, geom.pads))
        geom = ConvGeometry(geom.weight, geom.groups, geom.stride, geom.dilation,
                            tuple((0, 0) for _ in geom.pads), "zeros")
    grid = zero_padded_grid(geom, n)
    sub = tuple(m // s for m, s in zip(grid, geom.stride))
    return phase_stack(geom.dilated_weight(), geom.groups, geom.stride), sub, factor


@torch.no_grad()
def peak(geom: ConvGeometry, n: Sequence[int]) -> Peak:
    """The block that attains the FFT bound, found over the whole spectrum without autograd."""
    stacked, sub, factor = _stacked(geom, n)
    group, freq, norm = _argmax_block(stacked.detach(), sub)
    return Peak(group, freq, factor, norm * factor)


def block_norm(geom: ConvGeometry, n: Sequence[int], at: Peak,
               start: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The 2-norm of one per-frequency block (times ||P||), differentiable in ``geom.weight``,
    and the singular vector found (pass it back as ``start`` on the next step: warm start).

    Computed by an explicit DFT of the kernel at that frequency only, so a training step never
    runs a backward pass through the full FFT (the gradient of a max is that of its argmax).
    """
    stacked, sub, factor = _stacked(geom, n)
    taps = [torch.arange(k, device=stacked.device, dtype=torch.float64) for k in stacked.shape[3:]]
    phase = sum(  # -2 pi f.t / n on the kernel's taps (taps past the grid wrap: exp is periodic)
        (-2 * math.pi * f / m) * t.reshape([-1 if i == j else 1 for j in range(len(sub))])
        for i, (f, m, t) in enumerate(zip(at.freq, sub, taps))
    )
    e = torch.polar(torch.ones_like(phase), phase).to(_complex(stacked.dtype))
    block = (stacked[at.group] * e).sum(dim=tuple(range(2, stacked.dim() - 1)))  # (Cout_g, Cin_g * P)
    if min(block.shape) == 1:
        return torch.linalg.vector_norm(block) * factor, None
    # The value only carries the gradient (callers add the exact bound as a constant), so a
    # power iteration on the tiny Gram matrix is enough, and keeps LAPACK out of every step:
    # its thread pool then competes with the convolutions' on small CPUs. Warm-started from the
    # previous step's vector, a few iterations do (the peak's block changes little per step).
    a = block.detach()
    right = block.shape[1] <= block.shape[0]
    gram = a.mH @ a if right else a @ a.mH
    cold = start is None or start.shape != (gram.shape[0], 1) or start.dtype != gram.dtype or start.device != gram.device
    v = torch.ones(gram.shape[0], 1, dtype=gram.dtype, device=gram.device) if cold else start
    with torch.no_grad():
        for _ in range(_GRAD_ITERS if cold else _WARM_ITERS):
            v = gram @ v
            v = v / torch.linalg.vector_norm(v).clamp_min(1e-30)
    return torch.linalg.vector_norm(block @ v if right else v.mH @ block) * factor, v


_GRAD_ITERS = 30
_WARM_ITERS = 3


def fft_bound(geom: ConvGeometry, n: Sequence[int]) -> torch.Tensor:
    """max over frequencies of the per-frequency block norm (the circulant-embedding bound,
    polyphase when strided), differentiable in ``geom.weight``."""
    at = peak(geom, n)
    grad, _ = block_norm(geom, n, at)
    return grad + (at.value - grad.detach())


@torch.no_grad()
def tap_drift(change: torch.Tensor, groups: int) -> float:
    """Upper bound on how much any per-frequency block norm can move when the kernel changes by
    ``change``: max over groups of sum over taps of ||change_t||_F.

    Each block is A(f) = sum_t W_t e^{-i f.t} (phases only regroup taps), so
    ||dA(f)|| <= sum_t ||dW_t|| at every frequency, and the block norm moves by at most that.
    """
    c = change.detach().to(torch.float64)
    per_tap = c.reshape(groups, c.shape[0] // groups, c.shape[1], -1).square().sum((1, 2)).sqrt()
    return float(per_tap.sum(1).max())


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@torch.no_grad()
def _argmax_block(stacked: torch.Tensor, sub: Sequence[int]) -> tuple[int, tuple[int, ...], float]:
    """(group, frequency index, 2-norm) of the per-frequency block with the largest 2-norm."""
    if any(k > m for k, m in zip(stacked.shape[3:], sub)):
        spec = transfer_matrices(stacked, sub).movedim((-2, -1), (1, 2))  # taps wrap around the grid
    else:  # zero padding never wraps: rfftn pads the kernel itself
        spec = torch.fft.rfftn(stacked, s=sub, dim=tuple(range(3, stacked.dim())))
    frob2 = torch.view_as_real(spec).square().sum(-1).sum((1, 2))  # (groups, *freqs)
    co, ci = spec.shape[1:3]
    if min(co, ci) == 1:  # rows or columns: the block norm is the Frobenius norm
        top = frob2.flatten()
    else:
        # the smaller Gram matrix of every block; its top eigenvalue is the block's norm squared
        blocks = spec.movedim((1, 2), (-2, -1)).reshape(-1, co, ci)
        gram = blocks.mH @ blocks if ci <= co else blocks @ blocks.mH
        top = torch.linalg.eigvalsh(gram)[..., -1]
    flat = top.argmax()
    group, *freq = (int(i) for i in torch.unravel_index(flat, frob2.shape))
    return group, tuple(freq), math.sqrt(max(float(top[flat]), 0.0))
