"""Sedghi et al.'s projection of a conv onto an operator-norm ball (their section 3)."""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import nn

from ..errors import ArgumentError
from .conv import zero_padded_grid
from .geometry import conv_geometry, describe
from .spectral import fold_kernel, phase_stack


def clip_operator_norm(conv: nn.Module, input_shape: Sequence[int], max_norm: float) -> torch.Tensor:
    """Kernel whose circulant operator has its singular values clipped to ``max_norm``, then
    projected back to the kernel's support (taps outside it dropped).

    Returns a new weight tensor of ``conv.weight``'s shape and dtype; ``conv`` is not modified.
    The clip is on the circulant of the input size (circular padding) or on the zero-padded
    conv's circulant embedding. As in the paper, the support projection can raise the norm again
    slightly; alternating the two (calling this repeatedly) converges towards the ball.
    """
    geom = conv_geometry(conv)
    label = describe(conv)
    n = tuple(input_shape)[1:]
    geom.check_input(n, label)
    grid = n if geom.padding_mode == "circular" and all(ni % s == 0 for ni, s in zip(n, geom.stride)) else (
        zero_padded_grid(geom, n)
    )
    stride = geom.stride
    sub = tuple(m // s for m, s in zip(grid, stride))
    d = geom.ndim
    wd = geom.dilated_weight().detach().to(torch.float64)
    stacked = phase_stack(wd, geom.groups, stride)  # (g, co, ci*P, *kq)
    dims = tuple(range(3, 3 + d))
    spec = torch.fft.fftn(fold_kernel(stacked, sub), dim=dims)
    blocks = spec.permute(0, *dims, 1, 2)
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    s = s.clamp(max=max_norm)
    clipped = (u * s.unsqueeze(-2).to(u.dtype)) @ vh
    clipped = clipped.permute(0, -2, -1, *range(1, 1 + d))
    spatial = torch.fft.ifftn(clipped, dim=dims).real  # (g, co, ci*P, *sub)
    # undo the phase stacking onto the grid, then keep the dilated kernel's taps only
    g, co, cip = spatial.shape[:3]
    ci = cip // math.prod(stride)
    spatial = spatial.reshape(g * co, ci, math.prod(stride), *sub)
    full = spatial.new_zeros(g * co, ci, *grid)
    for p, q in enumerate(itertools.product(*(range(s_) for s_ in stride))):
        index = (slice(None), slice(None)) + tuple(slice(qi, None, s_) for qi, s_ in zip(q, stride))
        full[index] = spatial[:, :, p]
    ke = geom.effective_kernel
    if any(k > m for k, m in zip(ke, grid)):
        raise ArgumentError(f"{label}: kernel extent {ke} exceeds the circulant grid {grid}; cannot clip")
    taps = full[(slice(None), slice(None)) + tuple(slice(0, k, dil) for k, dil in zip(ke, geom.dilation))]
    return taps.to(conv.weight.dtype).reshape(conv.weight.shape).clone()
