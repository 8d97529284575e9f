"""Differentiable conv-norm bounds for training-time normalization (MATH sections 1-3).

The certificate path (:mod:`lipfx.norms.conv`) works in float64 without gradients and proves
its results. During training the normalized weight is ``W * K / bound(W)`` and the bound must
carry gradients, so this module evaluates the same circulant-embedding bound with autograd, in
the weight's dtype, on the smallest grid that embeds the conv. The result is still an upper bound
on the layer's norm (up to float round-off), never an estimate from below.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .conv import zero_padded_grid
from .geometry import ConvGeometry, padding_norm
from .spectral import phase_stack, transfer_matrices


def fft_bound(geom: ConvGeometry, n: Sequence[int]) -> torch.Tensor:
    """max over frequencies of the per-frequency block norm, differentiable in ``geom.weight``.

    Depthwise blocks (one input channel per group) are rows or columns, so their norm is a
    vector norm; other blocks take a batched matrix 2-norm (SVD). Non-zero padding modes are
    bounded as ||P|| times the valid conv on the padded input, as in :func:`conv.conv_bound`.
    """
    factor = 1.0
    if geom.padding_mode != "zeros":
        factor = padding_norm(geom.padding_mode, n, geom.pads)
        n = tuple(ni + lo + hi for ni, (lo, hi) in zip(n, geom.pads))
        geom = ConvGeometry(geom.weight, geom.groups, geom.stride, geom.dilation,
                            tuple((0, 0) for _ in geom.pads), "zeros")
    grid = zero_padded_grid(geom, n)
    sub = tuple(m // s for m, s in zip(grid, geom.stride))
    weight = geom.dilated_weight()
    if all(s == 1 for s in geom.stride):
        stacked = weight.reshape(geom.groups, weight.shape[0] // geom.groups, *weight.shape[1:])
    else:
        stacked = phase_stack(weight, geom.groups, geom.stride)
    if any(k > m for k, m in zip(stacked.shape[3:], sub)):
        spec = transfer_matrices(stacked, sub).movedim((-2, -1), (1, 2))  # taps wrap around the grid
    else:  # zero padding never wraps: rfftn pads the kernel itself (fewer ops per step)
        spec = torch.fft.rfftn(stacked, s=sub, dim=tuple(range(3, stacked.dim())))
    power = torch.view_as_real(spec).square().sum(-1)  # |A(f)_ij|^2, (groups, Cout_g, Cin_g*P, *freqs)
    frob2 = power.sum((1, 2))
    co, ci = spec.shape[1:3]
    if min(co, ci) == 1:  # rows or columns (depthwise): the block norm is the Frobenius norm
        return torch.sqrt(frob2.amax()) * factor
    blocks = spec.movedim((1, 2), (-2, -1)).reshape(-1, co, ci)
    a = blocks[_candidates(blocks, frob2.flatten())]
    gram = a.mH @ a if ci <= co else a @ a.mH
    return torch.linalg.eigvalsh(gram)[..., -1].amax().clamp_min(0).sqrt() * factor


_SCREEN_ITERS = 6


@torch.no_grad()
def _candidates(blocks: torch.Tensor, frob2: torch.Tensor) -> torch.Tensor:
    """Indices of the blocks that can hold the largest singular value.

    A batched SVD of every per-frequency block (and its backward) dominates the step otherwise.
    ||A||_F^2 >= ||A||_2^2 per block, and a few power steps give lower estimates; a block whose
    Frobenius norm is below the best lower estimate cannot attain the max, so only the others go
    through the (differentiable) SVD. Exact: the max over the candidates is the max over all.
    """
    a = blocks.detach()
    gram = a.mH @ a if a.shape[-1] <= a.shape[-2] else a @ a.mH
    v = torch.ones(gram.shape[:-1] + (1,), dtype=gram.dtype, device=gram.device)
    v[..., 0, :] += 0.5  # not orthogonal to the usual leading vectors of smooth kernels
    for _ in range(_SCREEN_ITERS):
        v = gram @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(1e-30)
    lower = (v.mH @ gram @ v).real.flatten()
    best = float(lower.max()) * (1 - 1e-5)  # slack for the float round-off of both estimates
    return torch.nonzero(frob2.detach() >= best).flatten()
