"""Sound operator-norm bounds for convolutions (docs/math.md, sections 1-3, 5).

Each function returns an upper bound on the norm of the conv's linear part (bias ignored). The
padding mode decides the argument:
- zeros: the conv is a restriction of a circulant on a grid just large enough that no used
  output wraps around (so the bound is exact up to the boundary effect of zero padding);
- circular: the conv *is* (a row subset of) a circulant on the input grid itself: exact;
- reflect / replicate (and circular as a fallback): the conv is valid_conv o P with P the padding
  operator; ||P|| = sqrt(most copies of one element), so bound = ||P|| * bound(valid conv).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Optional, Sequence

import torch

from ..errors import ArgumentError, ShapeError
from .geometry import ConvGeometry, max_padding_multiplicity, padding_norm
from .spectral import (
    RELATIVE_SLACK,
    certified_matrix_norm,
    circulant_singular_values,
    max_transfer_norm,
    phase_stack,
)

RESOLUTION_FREE_GRID = 64  # per dim, for the sampled-frequency resolution-free bound
_SAMPLED_MAX_BLOCK = 64  # larger blocks make the sampled bound too slow to be worth it
_EXTRA_GRIDS = 3  # zero padding: also try grids this many strides larger...
_EXTRA_GRIDS_MAX_BLOCK = 8  # ...where the per-frequency blocks are this small (cheap)
_GRAM_MIN_SIDE = 64  # 2-D matrices with both sides at least this: Gram + Cholesky beats an SVD (10x at 512 x 4608)


_SAFE_SCALE = (2.0 ** -300, 2.0 ** 300)  # max|W| outside this: Gram products under/overflow float64


def _power_of_two_scale(weight: torch.Tensor) -> float:
    """1, or the power of two that brings max|W| near 1 when W is tiny or huge (exact to divide by)."""
    top = float(weight.detach().abs().max()) if weight.numel() else 0.0
    if top == 0.0 or not math.isfinite(top) or _SAFE_SCALE[0] <= top <= _SAFE_SCALE[1]:
        return 1.0
    return 2.0 ** math.floor(math.log2(top))


def scale_invariant(bound):
    """Evaluate a homogeneous bound (of a matrix, or of a conv's geometry) on the operator scaled by
    a power of two when its entries are tiny or huge, and scale the result back: float64 weights
    near 1e-170 would otherwise underflow in the Gram matrices and bound a non-zero operator by 0
    (docs/math.md, section 3)."""

    def wrapper(operator, *args, **kwargs):
        weight = operator.weight if isinstance(operator, ConvGeometry) else operator
        scale = _power_of_two_scale(weight)
        if scale == 1.0:
            return bound(operator, *args, **kwargs)
        scaled = weight.detach().to(torch.float64) / scale
        if isinstance(operator, ConvGeometry):
            scaled = dataclasses.replace(operator, weight=scaled)
        inner = bound(scaled, *args, **kwargs)
        out = inner * scale
        if 0 < inner and out < sys.float_info.min:
            # a subnormal product is rounded (two entries of 2^-1074 gave 2^-1074 for sqrt(2) x
            # 2^-1074): by at most half a subnormal step, so one step up covers it
            out = math.nextafter(out, math.inf)
        return out

    return functools.wraps(bound)(wrapper)


@scale_invariant
def matrix_norm(matrix: torch.Tensor) -> float:
    """Exact spectral norm (float64 SVD) with the rounding slack, for certificates."""
    m = matrix.detach().to(torch.float64)
    if m.numel() == 0:
        return 0.0
    if m.dim() == 3 and m.shape[0] == 1:  # one group
        m = m[0]
    if m.dim() == 2 and min(m.shape) >= _GRAM_MIN_SIDE:
        return certified_matrix_norm(m)
    return float(torch.linalg.matrix_norm(m, ord=2).max()) * (1 + RELATIVE_SLACK)


def grouped_matrix_norm(weight: torch.Tensor, groups: int) -> float:
    """Norm of a pointwise conv: block-diagonal over groups, so the max of the blocks."""
    w = weight.detach().reshape(groups, weight.shape[0] // groups, weight.shape[1])
    return matrix_norm(w)


def zero_padded_grid(geom: ConvGeometry, n: Sequence[int]) -> tuple[int, ...]:
    """Smallest circulant grid (a multiple of the stride) on which the zero-padded conv embeds.

    Output o reads padded positions o*s .. o*s + ke - 1; with a grid of at least
    (O-1)*s + ke positions no used output wraps around, and inputs past that are never read.
    """
    grid = []
    for ni, (lo, hi), ke, s in zip(n, geom.pads, geom.effective_kernel, geom.stride):
        outputs = (ni + lo + hi - ke) // s + 1
        used = (outputs - 1) * s + ke
        grid.append(s * math.ceil(used / s))
    return tuple(grid)


def _bound_on_grid(geom: ConvGeometry, grid: Sequence[int], stride: Sequence[int]) -> float:
    stacked = phase_stack(geom.dilated_weight(), geom.groups, stride)
    sub = tuple(m // s for m, s in zip(grid, stride))
    return max_transfer_norm(stacked, sub)


@scale_invariant
def zero_padded_bound(geom: ConvGeometry, n: Sequence[int]) -> float:
    """Circulant-embedding bound with explicit (lo, hi) zero pads; polyphase when strided.

    Every grid at least as large as :func:`zero_padded_grid` embeds the conv, so each gives a
    sound bound; where blocks are small (depthwise, narrow convs) the min over a few is cheap
    and tightens small resolutions (depthwise 3x3 at 7x7: median overestimate 6.7% -> 6.2%).
    """
    grid = zero_padded_grid(geom, n)
    block = min(geom.out_channels // geom.groups, geom.weight.shape[1] * math.prod(geom.stride))
    extra = _EXTRA_GRIDS if block <= _EXTRA_GRIDS_MAX_BLOCK else 0
    return min(
        _bound_on_grid(geom, tuple(m + j * s for m, s in zip(grid, geom.stride)), geom.stride)
        for j in range(extra + 1)
    )


@scale_invariant
def paper_bound(geom: ConvGeometry, n: Sequence[int]) -> float:
    """Runkel et al. Thm 2: FFT at N + 2p ignoring the stride (sound but loose when strided)."""
    grid = tuple(ni + lo + hi for ni, (lo, hi) in zip(n, geom.pads))
    unit = tuple(1 for _ in grid)
    return _bound_on_grid(geom, grid, unit) * padding_norm(geom.padding_mode, n, geom.pads)


@scale_invariant
def circular_bound(geom: ConvGeometry, n: Sequence[int]) -> Optional[float]:
    """Exact-domain bound for circular padding, or None when the rows are not a circulant subset.

    Output o reads x[(o*s + j - lo) mod N]: row o*s of the circulant on N. If those rows are
    distinct, the operator is a row subset of it (polyphase on N/s when s divides N).
    """
    outputs = geom.output_size(n)
    if any((o - 1) * s > ni - 1 for o, s, ni in zip(outputs, geom.stride, n)):
        return None  # over-padding: outputs repeat, not a row subset
    stride = tuple(s if ni % s == 0 else 1 for s, ni in zip(geom.stride, n))
    return _bound_on_grid(geom, tuple(n), stride)


def _valid_geometry(geom: ConvGeometry) -> ConvGeometry:
    zero = tuple((0, 0) for _ in geom.pads)
    return ConvGeometry(geom.weight, geom.groups, geom.stride, geom.dilation, zero, "zeros")


@scale_invariant
def conv_bound(geom: ConvGeometry, n: Optional[Sequence[int]], label: str) -> float:
    """Tightest sound bound this module knows for a conv at spatial input size ``n``."""
    if n is None:
        return resolution_free_bound(geom)
    geom.check_input(n, label)
    if geom.is_pointwise:
        # 1x1: the norm of the connectivity matrix, at every resolution and stride; padding
        # modes that copy elements multiply it by ||P||.
        return grouped_matrix_norm(geom.weight.flatten(1), geom.groups) * padding_norm(
            geom.padding_mode, n, geom.pads
        )
    if geom.padding_mode == "zeros":
        return zero_padded_bound(geom, n)
    padded = tuple(ni + lo + hi for ni, (lo, hi) in zip(n, geom.pads))
    bound = padding_norm(geom.padding_mode, n, geom.pads) * zero_padded_bound(_valid_geometry(geom), padded)
    if geom.padding_mode == "circular":
        exact = circular_bound(geom, n)
        if exact is not None:
            bound = min(bound, exact)
    return bound


def _per_tap_norms(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """||W_t||_2 per group and tap: (groups, *kernel)."""
    w = weight.detach().to(torch.float64)
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    taps = w.reshape(groups, cout // groups, cin_g, -1).permute(0, 3, 1, 2)
    return torch.linalg.matrix_norm(taps, ord=2).reshape(groups, *k)


@scale_invariant
def singla_feizi_bound(geom: ConvGeometry) -> float:
    """sqrt(hw) * min(||R||, ||S||) (Singla & Feizi 2021, Thm 1), 2-D, resolution-free.

    Applied to the undilated kernel (the sup over frequencies does not change with dilation);
    strides only drop rows; grouped convs take the max over groups; copying padding modes
    multiply by the padding operator's norm.
    """
    return _singla_feizi_core(geom) * _resolution_free_padding_norm(geom)


def _singla_feizi_core(geom: ConvGeometry) -> float:
    if geom.ndim != 2:
        raise ArgumentError("the Singla-Feizi bound is defined for 2-D convolutions")
    w = geom.weight.detach().to(torch.float64)
    g = geom.groups
    cout, cin_g, h, wd = w.shape
    blocks = w.reshape(g, cout // g, cin_g, h, wd)
    r = blocks.permute(0, 1, 3, 2, 4).reshape(g, (cout // g) * h, cin_g * wd)
    s = blocks.permute(0, 1, 4, 2, 3).reshape(g, (cout // g) * wd, cin_g * h)
    best = min(float(torch.linalg.matrix_norm(r, ord=2).max()), float(torch.linalg.matrix_norm(s, ord=2).max()))
    return math.sqrt(h * wd) * best * (1 + RELATIVE_SLACK)


def _resolution_free_padding_norm(geom: ConvGeometry) -> float:
    if geom.padding_mode == "zeros":
        return 1.0
    if geom.padding_mode == "circular" and all(
        lo + hi <= ke - 1 for (lo, hi), ke in zip(geom.pads, geom.effective_kernel)
    ):
        return 1.0  # distinct circulant rows at every size: a row subset of a circulant
    total = 1
    for lo, hi in geom.pads:
        total *= max_padding_multiplicity(geom.padding_mode, lo, hi)
    return math.sqrt(total)


@scale_invariant
def resolution_free_bound(geom: ConvGeometry) -> float:
    """A bound valid at every input size: sup over continuous frequencies of ||A(w)||.

    The minimum of three sound bounds of that supremum:
    - triangle inequality over taps: sum_t ||W_t||;
    - Singla-Feizi (2-D);
    - the max over a sampled frequency grid plus the most ||A|| can change between samples
      (||dA/dw_j|| <= sum_t ||W_t|| |t_j - c_j| with taps centred at c).
    Dilation does not change the supremum, so the undilated kernel is used; a stride only drops rows.
    """
    if geom.is_pointwise:
        return grouped_matrix_norm(geom.weight.flatten(1), geom.groups) * _resolution_free_padding_norm(geom)
    tap_norms = _per_tap_norms(geom.weight, geom.groups)  # (g, *k)
    candidates = [float(tap_norms.flatten(1).sum(1).max())]
    if geom.ndim == 2:
        candidates.append(_singla_feizi_core(geom))
    if min(geom.out_channels // geom.groups, geom.weight.shape[1]) <= _SAMPLED_MAX_BLOCK:
        grid = (RESOLUTION_FREE_GRID,) * geom.ndim
        sampled = max_transfer_norm(phase_stack(geom.weight, geom.groups, (1,) * geom.ndim), grid)
        drift = 0.0
        for dim, k in enumerate(geom.kernel_size):
            offsets = (torch.arange(k, dtype=torch.float64) - (k - 1) / 2).abs()
            shape = [1] * (tap_norms.dim() - 1)
            shape[dim] = k
            lipschitz = (tap_norms * offsets.reshape(shape)).flatten(1).sum(1)
            # a frequency is at most pi/n away from a sample in each dim
            drift += float(lipschitz.max()) * math.pi / RESOLUTION_FREE_GRID
        candidates.append(sampled + drift)
    return min(candidates) * (1 + RELATIVE_SLACK) * _resolution_free_padding_norm(geom)




def conv_singular_values(geom: ConvGeometry, n: Sequence[int], label: str) -> torch.Tensor:
    """Singular values of the circulant (circular padding, unit stride: exactly the conv's own)
    or of the circulant embedding (other cases: the largest bounds the conv's norm)."""
    geom.check_input(n, label)
    if geom.padding_mode == "circular":
        outputs = geom.output_size(n)
        if all((o - 1) * s <= ni - 1 and ni % s == 0 for o, s, ni in zip(outputs, geom.stride, n)):
            stacked = phase_stack(geom.dilated_weight(), geom.groups, geom.stride)
            return circulant_singular_values(stacked, tuple(ni // s for ni, s in zip(n, geom.stride)))
    if geom.padding_mode not in ("zeros", "circular"):
        raise ShapeError(f"{label}: singular values are defined for zero or circular padding only")
    grid = zero_padded_grid(geom, n)
    stacked = phase_stack(geom.dilated_weight(), geom.groups, geom.stride)
    return circulant_singular_values(stacked, tuple(m // s for m, s in zip(grid, geom.stride)))
