"""Lipschitz rules for layers, normalisation, pooling, resampling, shape and arithmetic ops.

Activations live in :mod:`lipfx.certify.activations`. Every factor here is an upper bound on the
op's l2 operator norm (or Lipschitz constant); fixed linear maps that factor over dimensions
(pooling, interpolation) are bounded exactly as the product of their 1-D matrix norms.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..layers import ChannelAffine, SeparableConv
from ..norms import layer_bound
from ..norms.conv import matrix_norm
from ..norms.geometry import padding_multiplicity
from ..norms.spectral import RELATIVE_SLACK
from ..passes.batchnorm import eval_scale
from .registry import (
    NodeContext,
    Step,
    Unbounded,
    broadcast_factor,
    numel,
    register_function_rule,
    register_method_rule,
    register_module_rule,
)

PRODUCT_REASON = (
    "product of two input-dependent tensors (attention, a squeeze-excitation or other gate): "
    "not globally Lipschitz"
)
STATISTICS_REASON = (
    "normalises by statistics of its own input: not globally Lipschitz (its slope grows without "
    "bound as the input's variance goes to 0)"
)
ATTENTION_REASON = "attention softmax(QK^T)V multiplies input-dependent tensors: not globally Lipschitz"


def _linear(factor: float, method: str) -> Step:
    """An affine one-input op with operator norm ``factor``."""
    return Step.scale(factor, method, linear=True)


def _tuple(value: Any, d: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * d


# --- layers with weights ----------------------------------------------------------------------
@register_module_rule(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _weighted_layer(ctx: NodeContext) -> Step:
    shape = tuple(ctx.shape()[1:])
    method = "exact SVD" if isinstance(ctx.module, nn.Linear) else f"layer_bound({ctx.method})"
    return _linear(layer_bound(ctx.module, shape, ctx.method, ctx.module_name), method)


@register_module_rule(SeparableConv)
def _separable(ctx: NodeContext) -> Step:
    shape = tuple(ctx.shape()[1:])
    dw = layer_bound(ctx.module.depthwise, shape, ctx.method, f"{ctx.module_name}.depthwise")
    mid = (ctx.module.depthwise.out_channels,) + tuple(ctx.shapes[ctx.node][2:])
    pw = layer_bound(ctx.module.pointwise, mid, ctx.method, f"{ctx.module_name}.pointwise")
    return _linear(dw * pw, "product of depthwise and pointwise bounds")


@register_module_rule(ChannelAffine)
def _channel_affine(ctx: NodeContext) -> Step:
    return _linear(_max_abs(ctx.module.scale), "per-channel scale: max|a|")


def _max_abs(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) * (1 + RELATIVE_SLACK) if t.numel() else 0.0


@register_module_rule(_BatchNorm, _InstanceNorm)
def _batchnorm(ctx: NodeContext) -> Step:
    m = ctx.module
    if m.training or m.running_var is None:
        raise Unbounded(f"{ctx.label}: {'train-mode ' if m.training else ''}{type(m).__name__} {STATISTICS_REASON}")
    return _linear(_max_abs(eval_scale(m.running_var, m.weight, m.eps)), "eval BatchNorm: max|gamma / sqrt(var + eps)|")


@register_function_rule(F.batch_norm)
def _batchnorm_function(ctx: NodeContext) -> Step:
    var, weight = ctx.arg(2, "running_var"), ctx.arg(3, "weight")
    if ctx.arg(5, "training", False) or not isinstance(var, torch.Tensor):
        raise Unbounded(f"{ctx.label}: batch_norm with batch statistics {STATISTICS_REASON}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise Unbounded(f"{ctx.label}: batch_norm with an input-dependent weight")
    a = eval_scale(var, weight, ctx.arg(7, "eps", 1e-5))
    return _linear(_max_abs(a), "eval batch_norm: max|gamma / sqrt(var + eps)|")


def _unbounded(reason: str) -> Callable[[NodeContext], Step]:
    def rule(ctx: NodeContext) -> Step:
        raise Unbounded(f"{ctx.label}: {reason}")

    return rule


_norm_modules = [nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm] + ([nn.RMSNorm] if hasattr(nn, "RMSNorm") else [])
register_module_rule(*_norm_modules)(_unbounded(STATISTICS_REASON))
_norm_functions = [F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm, F.normalize]
register_function_rule(*_norm_functions + ([F.rms_norm] if hasattr(F, "rms_norm") else []))(
    _unbounded(STATISTICS_REASON)
)
register_module_rule(nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Transformer)(
    _unbounded(ATTENTION_REASON)
)
register_function_rule(F.scaled_dot_product_attention, F.multi_head_attention_forward)(_unbounded(ATTENTION_REASON))
register_module_rule(nn.Bilinear)(_unbounded(PRODUCT_REASON))


# --- pooling: exact products of 1-D operator norms --------------------------------------------
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


def _pool_dims(ctx: NodeContext, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    in_shape, out_shape = ctx.shape(), ctx.out_shape
    return tuple(in_shape[-d:]), tuple(out_shape[-d:])


_POOL_DIM = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
             nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
             nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}


@register_module_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _maxpool_module(ctx: NodeContext) -> Step:
    m, d = ctx.module, _POOL_DIM[type(ctx.module)]
    return _maxpool_step(ctx, d, m.kernel_size, m.stride, m.padding, m.dilation)


def _maxpool_step(ctx: NodeContext, d: int, kernel, stride, padding, dilation) -> Step:
    in_sp, out_sp = _pool_dims(ctx, d)
    kernel = _tuple(kernel, d)
    stride = _tuple(stride if stride not in (None, []) else kernel, d)
    f = _maxpool_factor(in_sp, out_sp, kernel, stride, _tuple(padding, d), _tuple(dilation, d))
    return Step.scale(f, "max pooling: sqrt(most windows per input)")


@register_module_rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _avgpool_module(ctx: NodeContext) -> Step:
    m, d = ctx.module, _POOL_DIM[type(ctx.module)]
    return _avgpool_step(ctx, d, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                         getattr(m, "divisor_override", None))


def _avgpool_step(ctx, d, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> Step:
    in_sp, out_sp = _pool_dims(ctx, d)
    kernel = _tuple(kernel, d)
    stride = _tuple(stride if stride not in (None, []) else kernel, d)
    f = _avgpool_factor(in_sp, out_sp, kernel, stride, _tuple(padding, d), ceil_mode, count_include_pad, divisor_override)
    return _linear(f, "average pooling: exact norm (product of 1-D maps)")


@register_module_rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _adaptive_avg_module(ctx: NodeContext) -> Step:
    in_sp, out_sp = _pool_dims(ctx, _POOL_DIM[type(ctx.module)])
    return _linear(_adaptive_avg_factor(in_sp, out_sp), "adaptive average pooling: exact norm")


@register_module_rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def _adaptive_max_module(ctx: NodeContext) -> Step:
    if ctx.module.return_indices:
        raise Unbounded(f"{ctx.label}: pooling that returns indices")
    in_sp, out_sp = _pool_dims(ctx, _POOL_DIM[type(ctx.module)])
    return Step.scale(_adaptive_max_factor(in_sp, out_sp), "adaptive max pooling: sqrt(most windows per input)")


def _register_functional_pools() -> None:
    for d, fn in ((1, F.max_pool1d), (2, F.max_pool2d), (3, F.max_pool3d)):
        def rule(ctx: NodeContext, d: int = d) -> Step:
            if ctx.arg(6, "return_indices", False):
                raise Unbounded(f"{ctx.label}: pooling that returns indices")
            return _maxpool_step(ctx, d, ctx.arg(1, "kernel_size"), ctx.arg(2, "stride"), ctx.arg(3, "padding", 0),
                                 ctx.arg(4, "dilation", 1))

        register_function_rule(fn)(rule)
    for d, fn in ((1, F.avg_pool1d), (2, F.avg_pool2d), (3, F.avg_pool3d)):
        def rule(ctx: NodeContext, d: int = d) -> Step:
            return _avgpool_step(ctx, d, ctx.arg(1, "kernel_size"), ctx.arg(2, "stride"), ctx.arg(3, "padding", 0),
                                 ctx.arg(4, "ceil_mode", False), ctx.arg(5, "count_include_pad", True),
                                 ctx.arg(6, "divisor_override") if d > 1 else None)

        register_function_rule(fn)(rule)
    for d, fn in ((1, F.adaptive_avg_pool1d), (2, F.adaptive_avg_pool2d), (3, F.adaptive_avg_pool3d)):
        def rule(ctx: NodeContext, d: int = d) -> Step:
            in_sp, out_sp = _pool_dims(ctx, d)
            return _linear(_adaptive_avg_factor(in_sp, out_sp), "adaptive average pooling: exact norm")

        register_function_rule(fn)(rule)
    for d, fn in ((1, F.adaptive_max_pool1d), (2, F.adaptive_max_pool2d), (3, F.adaptive_max_pool3d)):
        def rule(ctx: NodeContext, d: int = d) -> Step:
            if ctx.arg(2, "return_indices", False):
                raise Unbounded(f"{ctx.label}: pooling that returns indices")
            in_sp, out_sp = _pool_dims(ctx, d)
            return Step.scale(_adaptive_max_factor(in_sp, out_sp), "adaptive max pooling: sqrt(most windows per input)")

        register_function_rule(fn)(rule)


_register_functional_pools()


# --- resampling and padding -------------------------------------------------------------------
def _interpolation_factor(ctx: NodeContext, size, scale_factor, mode, align_corners, recompute, antialias) -> Step:
    in_shape, out_shape = ctx.shape(), ctx.out_shape
    d = len(in_shape) - 2
    in_sp, out_sp = tuple(in_shape[2:]), tuple(out_shape[2:])
    use_size = size is not None or recompute or scale_factor is None
    scales = _tuple(scale_factor, d) if scale_factor is not None else None
    kwargs = {} if mode in ("nearest", "area", "nearest-exact") else {"align_corners": align_corners}
    if antialias:
        kwargs["antialias"] = True

    # Interpolation factors over dims: apply it to unit impulses along one dim at a time,
    # with every other dim of size 1 kept at size 1 (identity there).
    def one_dim(dim: int, n: int) -> torch.Tensor:
        shape = [1] * d
        shape[dim] = n
        eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, *shape)
        if use_size:
            target = [1] * d
            target[dim] = out_sp[dim]
            out = F.interpolate(eye, size=tuple(target), mode=mode, **kwargs)
        else:
            sf = [1.0] * d
            sf[dim] = float(scales[dim])
            out = F.interpolate(eye, scale_factor=tuple(sf), mode=mode, **kwargs)
        return out.reshape(n, -1)

    return _linear(_separable_norm(in_sp, one_dim), f"interpolation ({mode}): exact norm (product of 1-D maps)")


@register_module_rule(nn.Upsample)
def _upsample_module(ctx: NodeContext) -> Step:
    m = ctx.module
    return _interpolation_factor(ctx, m.size, m.scale_factor, m.mode, m.align_corners,
                                 getattr(m, "recompute_scale_factor", None), False)


@register_function_rule(F.interpolate)
def _interpolate_function(ctx: NodeContext) -> Step:
    return _interpolation_factor(ctx, ctx.arg(1, "size"), ctx.arg(2, "scale_factor"), ctx.arg(3, "mode", "nearest"),
                                 ctx.arg(4, "align_corners"), ctx.arg(5, "recompute_scale_factor"),
                                 ctx.arg(6, "antialias", False))


def _pad_factor(ctx: NodeContext, pad: Sequence[int], mode: str) -> Step:
    if mode in ("constant", "zeros"):
        return _linear(1.0, "constant padding: norm 1")
    shape = ctx.shape()
    count = 1
    for j in range(len(pad) // 2):  # pad lists the last dim first
        n = int(shape[-1 - j])
        count *= padding_multiplicity(mode, n, max(pad[2 * j], 0), max(pad[2 * j + 1], 0))
    return _linear(math.sqrt(count), f"{mode} padding: sqrt(most copies of one element)")


@register_function_rule(F.pad)
def _pad_function(ctx: NodeContext) -> Step:
    return _pad_factor(ctx, ctx.arg(1, "pad"), ctx.arg(2, "mode", "constant"))


_PAD_MODES = {"Zero": "constant", "Constant": "constant", "Reflection": "reflect", "Replication": "replicate",
              "Circular": "circular"}
_pad_modules = [getattr(nn, f"{p}Pad{d}d") for p in _PAD_MODES for d in (1, 2, 3) if hasattr(nn, f"{p}Pad{d}d")]


@register_module_rule(*_pad_modules)
def _pad_module(ctx: NodeContext) -> Step:
    mode = next(v for k, v in _PAD_MODES.items() if type(ctx.module).__name__.startswith(k))
    return _pad_factor(ctx, ctx.module.padding, mode)


# --- shape ops: permutations and selections have norm 1 ---------------------------------------
def _one(method: str) -> Callable[[NodeContext], Step]:
    return lambda ctx: _linear(1.0, method)


_RESHAPE = "reshape/permute/select: norm 1"
register_module_rule(nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)(_one(_RESHAPE))
register_function_rule(
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.squeeze, torch.unsqueeze,
    torch.chunk, torch.split, torch.unbind, torch.narrow, torch.movedim, torch.roll, torch.flip, torch.t,
    torch.clone, torch.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle, operator.neg, operator.pos, torch.neg, torch.unflatten,
)(_one(_RESHAPE))
register_method_rule(
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "t", "contiguous", "squeeze",
    "unsqueeze", "view_as", "reshape_as", "narrow", "movedim", "chunk", "split", "unbind", "to", "float",
    "double", "clone", "detach", "type_as", "roll", "flip", "neg", "__neg__",
)(_one(_RESHAPE))
register_function_rule(torch.abs, operator.abs)(lambda ctx: Step.scale(1.0, "|x|: 1-Lipschitz"))
register_method_rule("abs")(lambda ctx: Step.scale(1.0, "|x|: 1-Lipschitz"))


@register_function_rule(operator.getitem)
def _getitem(ctx: NodeContext) -> Step:
    obj, index = ctx.node.args[0], ctx.node.args[1]
    if ctx.depends(index) or _contains_dependent(ctx, index):
        raise Unbounded(f"{ctx.label}: indexing with input-dependent indices is not continuous")
    if not isinstance(ctx.shapes.get(obj), torch.Size):
        return _linear(1.0, "item of a tuple: norm <= 1")
    copies = 1
    for item in index if isinstance(index, tuple) else (index,):
        item = ctx.value(item)
        if isinstance(item, torch.Tensor) and item.dtype != torch.bool:
            counts = torch.unique(item, return_counts=True)[1]
            copies *= int(counts.max()) if counts.numel() else 1
        elif isinstance(item, (list, tuple)) and item and all(isinstance(i, int) for i in item):
            copies *= max(Counter(item).values())
    method = "selection: norm 1" if copies == 1 else "indexing with repeats: sqrt(most copies)"
    return _linear(math.sqrt(copies), method)


def _contains_dependent(ctx: NodeContext, index: Any) -> bool:
    if isinstance(index, (list, tuple)):
        return any(_contains_dependent(ctx, i) for i in index)
    if isinstance(index, slice):
        return any(ctx.depends(v) for v in (index.start, index.stop, index.step))
    return ctx.depends(index)


def _copies(ctx: NodeContext) -> Step:
    return _linear(broadcast_factor(ctx.shape(), ctx.out_shape), "copies elements: sqrt(copies)")


register_method_rule("expand", "expand_as", "repeat", "tile", "broadcast_to")(_copies)
register_function_rule(torch.tile, torch.broadcast_to)(_copies)


@register_function_rule(torch.repeat_interleave)
def _repeat_interleave(ctx: NodeContext) -> Step:
    repeats = ctx.arg(1, "repeats")
    if isinstance(repeats, torch.Tensor) and repeats.numel() > 1:
        return _linear(math.sqrt(float(repeats.max())), "copies elements: sqrt(most copies)")
    return _copies(ctx)


register_method_rule("repeat_interleave")(_repeat_interleave)


def _reduction(kind: str) -> Callable[[NodeContext], Step]:
    def rule(ctx: NodeContext) -> Step:
        n = numel(ctx.shape()) / max(numel(ctx.out_shape), 1)  # values reduced into each output
        if kind == "mean":
            return _linear(1.0 / math.sqrt(n), "mean of n values: 1/sqrt(n)")
        return _linear(math.sqrt(n), "sum of n values: sqrt(n)")

    return rule


register_function_rule(torch.mean)(_reduction("mean"))
register_method_rule("mean")(_reduction("mean"))
register_function_rule(torch.sum)(_reduction("sum"))
register_method_rule("sum")(_reduction("sum"))


# --- arithmetic -------------------------------------------------------------------------------
def _operand_factors(ctx: NodeContext, operands: Sequence[tuple[Any, float]]) -> tuple[float, ...]:
    """Factor of each input-dependent operand (in order): |weight| * sqrt(broadcast copies)."""
    out = ctx.out_shape
    factors = []
    for operand, weight in operands:
        if ctx.depends(operand):
            factors.append(abs(weight) * broadcast_factor(ctx.shape(operand), out))
    return tuple(factors)


def _add_sub(sign: float) -> Callable[[NodeContext], Step]:
    def rule(ctx: NodeContext) -> Step:
        a, b = ctx.node.args[0], ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.node.kwargs["other"]
        alpha = ctx.arg(2, "alpha", 1)
        if ctx.depends(alpha):
            return _product(ctx)
        return Step(_operand_factors(ctx, [(a, 1.0), (b, sign * alpha)]), "sum: triangle inequality", linear=True)

    return rule


register_function_rule(operator.add, operator.iadd, torch.add)(_add_sub(1.0))
register_method_rule("add", "add_", "__add__", "__radd__")(_add_sub(1.0))
register_function_rule(operator.sub, operator.isub, torch.sub, torch.subtract)(_add_sub(-1.0))
register_method_rule("sub", "sub_", "__sub__")(_add_sub(-1.0))


def _product(ctx: NodeContext) -> Step:
    raise Unbounded(f"{ctx.label}: {PRODUCT_REASON}")


def _max_abs_value(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return _max_abs(value.double())
    return abs(float(value))


@register_function_rule(operator.mul, operator.imul, torch.mul, torch.multiply)
def _mul(ctx: NodeContext) -> Step:
    a, b = ctx.node.args[0], ctx.node.args[1]
    if ctx.depends(a) and ctx.depends(b):
        _product(ctx)
    dep, const = (a, b) if ctx.depends(a) else (b, a)
    c = _max_abs_value(ctx.value(const))
    return _linear(c * broadcast_factor(ctx.shape(dep), ctx.out_shape), "times a constant: max|c|")


register_method_rule("mul", "mul_", "__mul__", "__rmul__")(_mul)


@register_function_rule(operator.truediv, operator.itruediv, torch.div, torch.true_divide)
def _div(ctx: NodeContext) -> Step:
    a, b = ctx.node.args[0], ctx.node.args[1]
    if ctx.depends(b):
        raise Unbounded(f"{ctx.label}: division by an input-dependent tensor is not globally Lipschitz")
    if ctx.arg(2, "rounding_mode") is not None:
        raise Unbounded(f"{ctx.label}: rounding division is not continuous")
    denominator = ctx.value(b)
    smallest = float(denominator.double().abs().min()) if isinstance(denominator, torch.Tensor) else abs(float(denominator))
    if smallest == 0.0:
        raise Unbounded(f"{ctx.label}: division by a constant that contains 0")
    factor = broadcast_factor(ctx.shape(a), ctx.out_shape) / smallest * (1 + RELATIVE_SLACK)
    return _linear(factor, "divided by a constant: 1/min|c|")


register_method_rule("div", "div_", "__truediv__")(_div)


@register_function_rule(operator.matmul, torch.matmul, torch.mm, torch.bmm)
def _matmul(ctx: NodeContext) -> Step:
    a, b = ctx.node.args[0], ctx.node.args[1]
    if ctx.depends(a) and ctx.depends(b):
        _product(ctx)
    const = ctx.value(b if ctx.depends(a) else a)
    if not isinstance(const, torch.Tensor) or const.dim() > 2:
        raise Unbounded(f"{ctx.label}: matmul with a batched or non-tensor constant has no rule")
    return _linear(matrix_norm(const.reshape(-1, 1) if const.dim() == 1 else const), "times a constant matrix: exact SVD")


register_method_rule("matmul", "mm", "__matmul__")(_matmul)


@register_function_rule(F.linear)
def _linear_function(ctx: NodeContext) -> Step:
    if ctx.depends(ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.node.kwargs.get("weight")):
        _product(ctx)
    return _linear(matrix_norm(ctx.arg(1, "weight")), "exact SVD")


def _concat(ctx: NodeContext) -> Step:
    # the parts are disjoint blocks of the output: L = sqrt(sum L_i^2)
    return Step(tuple(1.0 for _ in ctx.inputs), "concatenation: sqrt(sum of squares)", combine="l2", linear=True)


register_function_rule(torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack)(_concat)


def _register_torchvision() -> None:
    """torchvision wraps a few functions with torch.fx.wrap, so they appear as graph nodes."""
    try:
        from torchvision.models import swin_transformer
        from torchvision.ops import stochastic_depth
    except ImportError:
        return

    @register_function_rule(stochastic_depth)
    def _stochastic_depth(ctx: NodeContext) -> Step:
        if ctx.arg(3, "training", True) and ctx.arg(1, "p", 0.0) > 0:
            raise Unbounded(f"{ctx.label}: stochastic depth traced in training mode is random; trace in eval mode")
        return _linear(1.0, "stochastic depth (eval): identity")

    register_function_rule(swin_transformer.shifted_window_attention)(_unbounded(ATTENTION_REASON))
    # zero padding then a permutation of the elements
    register_function_rule(swin_transformer._patch_merging_pad)(_one("zero pad and regroup: norm 1"))


_register_torchvision()
