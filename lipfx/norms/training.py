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
    stacked = phase_stack(geom.dilated_weight(), geom.groups, geom.stride)
    spec = transfer_matrices(stacked, tuple(m // s for m, s in zip(grid, geom.stride)))
    if min(spec.shape[-2:]) == 1:
        norms = torch.sqrt((spec.real.square() + spec.imag.square()).sum(dim=(-1, -2)))
    else:
        norms = torch.linalg.matrix_norm(spec, ord=2)
    return norms.amax() * factor
