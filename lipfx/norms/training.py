"""Conv-norm bounds and their gradients for training-time normalization (docs/math.md, sections 1-3).

The certificate path (:mod:`lipfx.norms.conv`) works in float64 and proves its results. During
training the normalized weight is ``W * K / bound(W)``, recomputed every step, so this module
evaluates the same circulant-embedding bound in the weight's dtype, on the smallest grid that
embeds the conv, and gives its gradient in closed form (:class:`BlockGradient`) instead of
through autograd: a step then costs a few small kernels per layer. The value is still an upper
bound on the layer's norm (up to float round-off), never an estimate from below.
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


class BlockGradient(NamedTuple):
    """The gradient of a layer's training bound with respect to its weight, factored: zero
    except in row-group ``group`` of ``weight.reshape(-1, rows, cols)``, where it is
    ``left @ right`` (``left``: rows x r, ``right``: r x cols). A max over groups and
    frequencies has the gradient of its argmax, so only one small block is ever non-zero."""

    group: int
    left: torch.Tensor
    right: torch.Tensor


def _subgrid(geom: ConvGeometry, n: Sequence[int]) -> tuple[ConvGeometry, tuple[int, ...], float]:
    """The zero-padded geometry the bound is taken on, its polyphase subgrid, and ||P||.

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
    return geom, tuple(m // s for m, s in zip(grid, geom.stride)), factor


@torch.no_grad()
def peak(geom: ConvGeometry, n: Sequence[int]) -> Peak:
    """The block that attains the FFT bound, found over the whole spectrum without autograd."""
    geom, sub, factor = _subgrid(geom, n)
    stacked = phase_stack(geom.dilated_weight(), geom.groups, geom.stride)
    group, freq, norm = _argmax_block(stacked.detach(), sub)
    return Peak(group, freq, factor, norm * factor)


@torch.no_grad()
def peak_map(geom: ConvGeometry, n: Sequence[int], at: Peak) -> torch.Tensor:
    """The block at ``at`` as a linear map of one group's kernel: a real (taps, 2P) matrix M with

        block = view_as_complex((W_g.reshape(Cout_g * Cin_g, taps) @ M).reshape(Cout_g, Cin_g * P, 2))

    (P = prod(stride) phases). Tap t sits at dilated position p = dilation * t, in phase
    p mod stride at phase-tap p // stride, which contributes exp(-2 pi i f.(p // stride) / sub)
    to its phase's column; taps past the subgrid wrap, and exp is periodic, so they need nothing.
    """
    _, sub, _ = _subgrid(geom, n)
    taps = torch.cartesian_prod(*(torch.arange(k) for k in geom.kernel_size)).reshape(-1, geom.ndim)
    pos = taps * torch.tensor(geom.dilation)
    stride = torch.tensor(geom.stride)
    phase, tq = pos % stride, pos // stride
    place = torch.tensor([math.prod(geom.stride[i + 1:]) for i in range(geom.ndim)])
    column = (phase * place).sum(1)  # phase index in phase_stack's (row-major) order
    angle = (tq.double() * torch.tensor([-2 * math.pi * f / m for f, m in zip(at.freq, sub)])).sum(1)
    m = torch.zeros(len(taps), math.prod(geom.stride), 2, dtype=torch.float64)
    m[torch.arange(len(taps)), column, 0] = torch.cos(angle)
    m[torch.arange(len(taps)), column, 1] = torch.sin(angle)
    return m.reshape(len(taps), -1).to(dtype=geom.weight.dtype, device=geom.weight.device)


@torch.no_grad()
def peak_gradient(weight: torch.Tensor, groups: int, phases: torch.Tensor, at: Peak,
                  start: Optional[torch.Tensor] = None) -> tuple[float, BlockGradient, Optional[torch.Tensor]]:
    """The norm of the block at ``at`` for the current kernel (times ||P||), its gradient with
    respect to the kernel, and the singular vector found (pass it back as ``start``: warm start).

    ``phases`` is :func:`peak_map`'s matrix. With the block's top singular pair A v = sigma u,
    d sigma = Re(u^H dA v) = Re<H, dA> for H = u v^H; pulled back through the linear map M
    this is ``view_as_real(H) @ M^T``. Never a full FFT, and no autograd graph: a training step
    spends a few small kernels per layer on it.
    """
    cout_g, cin_g = weight.shape[0] // groups, weight.shape[1]
    phases_n = phases.shape[1] // 2
    pairs = weight.reshape(groups, cout_g * cin_g, -1)[at.group] @ phases  # (rows, 2P): Re, Im
    if cout_g == 1 or cin_g * phases_n == 1:
        # a row or a column: the 2-norm is the Frobenius norm, and H = A / sigma
        sigma = float(torch.linalg.vector_norm(pairs))
        left = pairs * (at.factor / sigma) if sigma > 0 else torch.zeros_like(pairs)
        return sigma * at.factor, BlockGradient(at.group, left, phases.T), None
    block = torch.view_as_complex(pairs.reshape(cout_g, cin_g * phases_n, 2))
    right = block.shape[1] <= block.shape[0]
    gram = block.mH @ block if right else block @ block.mH
    cold = start is None or start.shape != (gram.shape[0], 1) or start.dtype != gram.dtype or start.device != gram.device
    vec = torch.ones(gram.shape[0], 1, dtype=gram.dtype, device=gram.device) if cold else start
    # the peak's block changes little per step: warm-started, a few iterations do
    for _ in range(_GRAD_ITERS if cold else _WARM_ITERS):
        vec = gram @ vec
        vec = vec / torch.linalg.vector_norm(vec).clamp_min(1e-30)
    other = block @ vec if right else block.mH @ vec
    sigma = float(torch.linalg.vector_norm(other))
    other = other / max(sigma, 1e-30)
    u, v = (other, vec) if right else (vec, other)
    h = (u @ v.mH).reshape(cout_g * cin_g, phases_n)
    left = torch.view_as_real(h).reshape(cout_g * cin_g, 2 * phases_n) * at.factor
    return sigma * at.factor, BlockGradient(at.group, left, phases.T), vec


_GRAD_ITERS = 30
_WARM_ITERS = 3


@torch.no_grad()
def tap_drift(change: torch.Tensor, groups: int) -> float:
    """Upper bound on how much any per-frequency block norm can move when the kernel changes by
    ``change``: max over groups of sum over taps of ||change_t||_F.

    Each block is A(f) = sum_t W_t e^{-i f.t} (phases only regroup taps), so
    ||dA(f)|| <= sum_t ||dW_t|| at every frequency, and the block norm moves by at most that.
    """
    c = change.reshape(groups, -1, math.prod(change.shape[2:]))
    if c.shape[1] == 1:  # one row per group (depthwise): sum of |taps|
        per_group = torch.linalg.vector_norm(c, ord=1, dim=(1, 2), dtype=torch.float64)
    else:
        per_group = torch.linalg.vector_norm(c, dim=1, dtype=torch.float64).sum(1)
    return float(per_group.amax())


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
