"""Entries for pooling: exact norms of average pooling (products of 1-D operator norms) and
max pooling's sqrt(most windows any input lies in) (docs/math.md, section 8). Each entry covers
the 1-D, 2-D and 3-D modules and their functional forms.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import L2Pool
from ..norms.conv import matrix_norm
from .context import NodeContext, Step, Unbounded, as_tuple, constant
from .fuzzing import FuzzCase, apply, randn
from .table import OpEntry, table


def _window_matrix(n: int, out: int, windows: Callable[[int], Sequence[int]]) -> torch.Tensor:
    m = torch.zeros(out, n, dtype=torch.float64)
    for o in range(out):
        for i in windows(o):
            if 0 <= i < n:
                m[o, i] = 1.0
    return m


def _max_multiplicity(m: torch.Tensor) -> float:
    return float(m.sum(0).max()) if m.numel() else 0.0


def _maxpool_factor(in_sp, out_sp, kernel, stride, padding, dilation) -> float:
    # |max_w x - max_w y| <= max_w |x - y|, so ||f(x) - f(y)||^2 <= m ||x - y||^2 with m the
    # most windows any input lies in (product over dims).
    m = 1.0
    for n, o, k, s, p, dl in zip(in_sp, out_sp, kernel, stride, padding, dilation):
        mat = _window_matrix(n, o, lambda q, k=k, s=s, p=p, dl=dl: [q * s - p + j * dl for j in range(k)])
        m *= _max_multiplicity(mat)
    return math.sqrt(m)


def _adaptive_windows(n: int, out: int) -> Callable[[int], range]:
    return lambda o: range((o * n) // out, -(-((o + 1) * n) // out))


def _adaptive_max_factor(in_sp, out_sp) -> float:
    m = 1.0
    for n, o in zip(in_sp, out_sp):
        m *= _max_multiplicity(_window_matrix(n, o, _adaptive_windows(n, o)))
    return math.sqrt(m)


def _separable_norm(in_sp: Sequence[int], one_dim: Callable[[int, int], torch.Tensor]) -> float:
    """Norm of a map that is a Kronecker product of 1-D maps: the product of their norms."""
    total = 1.0
    for dim, n in enumerate(in_sp):
        total *= matrix_norm(one_dim(dim, n))
    return total


def _avgpool_factor(in_sp, out_sp, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> float:
    if divisor_override:
        # a box sum divided by a constant: (1/D) times the Kronecker product of 0/1 window maps
        def sums(dim: int, n: int) -> torch.Tensor:
            k, s, p = kernel[dim], stride[dim], padding[dim]
            return _window_matrix(n, out_sp[dim], lambda q: range(q * s - p, q * s - p + k))

        return _separable_norm(in_sp, sums) / abs(divisor_override)

    def one_dim(dim: int, n: int) -> torch.Tensor:
        eye = torch.eye(n, dtype=torch.float64).unsqueeze(1)  # n unit impulses
        cols = F.avg_pool1d(eye, kernel[dim], stride[dim], padding[dim], ceil_mode, count_include_pad)
        return cols.squeeze(1)  # (n, out): the transposed 1-D matrix

    return _separable_norm(in_sp, one_dim)


def _adaptive_avg_factor(in_sp, out_sp) -> float:
    def one_dim(dim: int, n: int) -> torch.Tensor:
        return F.adaptive_avg_pool1d(torch.eye(n, dtype=torch.float64).unsqueeze(1), out_sp[dim]).squeeze(1)

    return _separable_norm(in_sp, one_dim)


_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d)
_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, F.adaptive_avg_pool1d,
                 F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
_ADAPTIVE_MAX = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, F.adaptive_max_pool1d,
                 F.adaptive_max_pool2d, F.adaptive_max_pool3d)
_DIM = {key: 1 + i % 3 for group in (_MAX, _AVG, _ADAPTIVE_AVG, _ADAPTIVE_MAX) for i, key in enumerate(group)}


def _dims(ctx: NodeContext) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(d, input spatial size, output spatial size) of a pooling node."""
    d = _DIM[type(ctx.module) if ctx.module is not None else ctx.node.target]
    return d, tuple(ctx.shape()[-d:]), tuple(ctx.out_shape[-d:])


def _params(ctx: NodeContext, names: Sequence[tuple[str, Any]]) -> list:
    """A pooling op's parameters, from its module or from the call's arguments (after the input)."""
    if ctx.module is not None:
        return [getattr(ctx.module, name, default) for name, default in names]
    return [ctx.arg(i + 1, name, default) for i, (name, default) in enumerate(names)]


def _max_rule(ctx: NodeContext) -> Step:
    kernel, stride, padding, dilation, _, indices = _params(ctx, (
        ("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
        ("return_indices", False)))
    if indices:
        raise Unbounded(f"{ctx.label}: pooling that returns indices")
    d, in_sp, out_sp = _dims(ctx)
    kernel = as_tuple(kernel, d)
    stride = as_tuple(stride if stride not in (None, []) else kernel, d)
    f = _maxpool_factor(in_sp, out_sp, kernel, stride, as_tuple(padding, d), as_tuple(dilation, d))
    return Step.scale(f, "max pooling: sqrt(most windows per input)")


def _avg_rule(ctx: NodeContext) -> Step:
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = _params(ctx, (
        ("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
        ("count_include_pad", True), ("divisor_override", None)))
    d, in_sp, out_sp = _dims(ctx)
    kernel = as_tuple(kernel, d)
    stride = as_tuple(stride if stride not in (None, []) else kernel, d)
    f = _avgpool_factor(in_sp, out_sp, kernel, stride, as_tuple(padding, d), ceil_mode, count_include_pad,
                        divisor if d > 1 else None)
    return Step.affine(f, "average pooling: exact norm (product of 1-D maps)")


def _adaptive_avg_rule(ctx: NodeContext) -> Step:
    _, in_sp, out_sp = _dims(ctx)
    return Step.affine(_adaptive_avg_factor(in_sp, out_sp), "adaptive average pooling: exact norm")


def _adaptive_max_rule(ctx: NodeContext) -> Step:
    (indices,) = _params(ctx, (("output_size", None), ("return_indices", False)))[1:]
    if indices:
        raise Unbounded(f"{ctx.label}: pooling that returns indices")
    _, in_sp, out_sp = _dims(ctx)
    return Step.scale(_adaptive_max_factor(in_sp, out_sp), "adaptive max pooling: sqrt(most windows per input)")


def _pool_cases(*calls: tuple[tuple, dict]) -> Callable:
    """Cases at sizes 7 (1-D), 6x5 (2-D), 4x5x3 (3-D) for each (args, kwargs) of the pooling op."""

    def gen(key, g: torch.Generator) -> list[FuzzCase]:
        size = {1: (7,), 2: (6, 5), 3: (4, 5, 3)}[_DIM[key]]
        return [FuzzCase(apply(key, *args, **kw), (randn((2, 3) + size, g),), f"{args} {kw}") for args, kw in calls]

    return gen


def _l2_pool_cases(key, g: torch.Generator) -> list[FuzzCase]:
    # small spatial sizes, every other channel near zero (the norm's kink), keepdim both ways
    cases = []
    for shape in ((2, 3, 5), (2, 4, 3, 2), (3, 2, 2, 2, 2)):
        spread = torch.tensor([1.0, 1e-3] * 2, dtype=torch.float64)[: shape[1]].reshape(1, -1, *[1] * (len(shape) - 2))
        cases += [FuzzCase(L2Pool(keep), (randn(shape, g) * spread,), f"keepdim={keep} at {shape}") for keep in (True, False)]
    return cases


ENTRIES = (
    OpEntry(_MAX, _max_rule, _pool_cases(((3,), {}), ((3,), dict(stride=1, padding=1)), ((2,), dict(stride=1, dilation=2))),
            doc="sqrt(most windows per input)"),
    OpEntry(_AVG, _avg_rule, _pool_cases(((3,), {}), ((3,), dict(stride=1, padding=1)),
                                         ((2,), dict(stride=1, padding=1, count_include_pad=False, ceil_mode=True))),
            doc="exact norm: product of 1-D maps"),
    OpEntry(_ADAPTIVE_AVG, _adaptive_avg_rule, _pool_cases(((1,), {}), ((2,), {}), ((3,), {})), doc="exact norm"),
    OpEntry(_ADAPTIVE_MAX, _adaptive_max_rule, _pool_cases(((1,), {}), ((2,), {}), ((3,), {})),
            doc="sqrt(most windows per input)"),
    OpEntry((L2Pool,), constant(1.0, "global l2 pooling: per-channel norms, 1-Lipschitz"), _l2_pool_cases,
            size_free=True, leaf=True, doc="1 (norm-preserving)"),
)
for _entry in ENTRIES:
    table().add(_entry)
