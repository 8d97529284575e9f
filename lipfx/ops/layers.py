"""Entries for layers with weights: linear, convs, their separable pairs, per-channel affines and
eval-mode BatchNorm. A weighted layer's entry has all its pieces: the certificate rule, its
operator norm (``layer_bound``), its linear map (composed with neighbours by the certificate) and
its normalization (``lipfx.normalize``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..certify.linear_chains import LinearMap, compose, diagonal
from ..layers import ChannelAffine, SeparableConv, Shift
from ..normalization.layers import ConvNormalization, DiagonalNormalization, MatrixNormalization
from ..normalization.options import NormOptions
from ..normalization.orthogonal import AOLNormalization, OrthogonalNormalization
from ..normalization.orthogonal_conv import AOLConvNormalization, OrthogonalConvNormalization, gnp_conv_reason
from ..norms import conv_layer_bound, linear_layer_bound
from ..norms.geometry import ConvGeometry, conv_geometry
from ..passes.batchnorm import eval_scale
from .bounds import layer_bound
from .context import NodeContext, Step, Unbounded, constant, max_abs
from .fuzzing import FuzzCase, apply, randn
from .table import OpEntry, table

STATISTICS_REASON = (
    "normalises by statistics of its own input: not globally Lipschitz (its slope grows without "
    "bound as the input's variance goes to 0)"
)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHTED = CONVS + (nn.Linear,)  # layers whose weight lipfx folds, rescales and normalizes


# --- nn.Linear, nn.Conv1d/2d/3d ---------------------------------------------------------------
def _weighted_rule(ctx: NodeContext) -> Step:
    shape = tuple(ctx.shape()[1:])
    method = "exact norm" if isinstance(ctx.module, nn.Linear) else f"layer_bound({ctx.method})"
    return Step.affine(layer_bound(ctx.module, shape, ctx.method, ctx.module_name), method)


def _conv_map(module: nn.Module, name: str, in_shape: torch.Size) -> Optional[LinearMap]:
    geom = conv_geometry(module, name)
    if geom.padding_mode != "zeros" or geom.ndim != len(in_shape) - 2:
        return None
    return LinearMap(geom.dilated_weight().double(), geom.groups, geom.stride, geom.pads, (name,), 1)


def _linear_map(module: nn.Linear, name: str, in_shape: torch.Size) -> Optional[LinearMap]:
    if len(in_shape) != 2:
        return None
    return LinearMap(module.weight.detach().double(), 1, (), (), (name,), 1)


def _normalize_matrix(module: nn.Module, shapes: list, k: float, o: NormOptions, name: str, groups: int = 1):
    """A linear layer or unpadded 1x1 conv: held to ``o.constraint``."""
    if o.constraint == "orthogonal":
        return OrthogonalNormalization(module.weight, groups, k, o.scaling, o.s_init, name=name)
    if o.constraint == "aol":
        return AOLNormalization(module.weight, groups, k, o.scaling, o.s_init, name=name)
    return MatrixNormalization(module.weight, groups, k, o.scaling, o.s_init, o.power_iters, name=name)


def _normalize_conv(module: nn.Module, shapes: list, k: float, o: NormOptions, name: str):
    geom = conv_geometry(module, name)
    if geom.is_pointwise and all(lo == hi == 0 for lo, hi in geom.pads):
        return _normalize_matrix(module, shapes, k, o, name, module.groups)
    sizes = [s[1:] for s in shapes]
    # depthwise convs, and paddings that repeat pixels, stay spectral (docs/math.md, 16)
    reason = None if o.constraint == "spectral" else gnp_conv_reason(geom)
    if o.constraint != "spectral" and reason is None:
        kind = OrthogonalConvNormalization if o.constraint == "orthogonal" else AOLConvNormalization
        return kind(module, sizes, k, o.scaling, o.s_init, name)
    p = ConvNormalization(module, sizes, k, o.scaling, o.s_init, name, o.power_iters)
    if reason is not None:  # say in the report why the constraint was not applied
        p.kind += f" (not {o.constraint}: {reason})"
    return p


def _fuzz_linear(key: type, g: torch.Generator) -> list[FuzzCase]:
    return [FuzzCase(nn.Linear(6, 4, bias=b), (randn((3, 6), g),), f"Linear(6, 4, bias={b})") for b in (True, False)]


_CONV_CASES = (  # (in, out, kernel, keyword arguments): full, strided, dilated, grouped, depthwise, 1x1
    (3, 4, 3, dict(padding=1)),
    (4, 4, 3, dict(stride=2, padding=1, groups=2)),
    (2, 3, 2, dict(dilation=2, padding="same")),
    (3, 6, 3, dict(groups=3, padding_mode="circular", padding=1)),
    (3, 5, 1, {}),
    (2, 2, 3, dict(padding_mode="reflect", padding=1)),
)


def _fuzz_conv(key: type, g: torch.Generator) -> list[FuzzCase]:
    d = CONVS.index(key) + 1
    size = {1: 9, 2: 6, 3: 4}[d]
    return [FuzzCase(apply(key, cin, cout, k, **kw), (randn((2, cin) + (size,) * d, g),), f"{key.__name__}{kw}")
            for cin, cout, k, kw in _CONV_CASES]


# --- lipfx's own layers -------------------------------------------------------------------------
def _separable_rule(ctx: NodeContext) -> Step:
    # the pair is one convolution: bound it as one (docs/math.md, section 8), else the product
    shape = tuple(ctx.shape()[1:])
    name = ctx.module_name
    inner = _conv_map(ctx.module.depthwise, f"{name}.depthwise", ctx.shape())
    outer = _conv_map(ctx.module.pointwise, f"{name}.pointwise", ctx.out_shape)
    whole = compose(outer, inner) if inner is not None and outer is not None else None
    dw = layer_bound(ctx.module.depthwise, shape, ctx.method, f"{name}.depthwise")
    mid = (ctx.module.depthwise.out_channels,) + tuple(ctx.shapes[ctx.node][2:])
    product = dw * layer_bound(ctx.module.pointwise, mid, ctx.method, f"{name}.pointwise")
    if whole is not None and ctx.method == "auto":
        composed = whole.bound(shape, f"separable pair '{name}'")
        if composed < product:
            return Step.affine(composed, "the pair as one conv")
    return Step.affine(product, "product of depthwise and pointwise bounds")


def _fuzz_separable(key: type, g: torch.Generator) -> list[FuzzCase]:
    from ..passes.separable import factorize_conv

    sep, _ = factorize_conv(nn.Conv2d(3, 4, 3, padding=1))
    pointwise, _ = factorize_conv(nn.Conv2d(3, 4, 1))  # composes to one matrix: the bound is exact
    return [FuzzCase(sep, (randn((2, 3, 6, 6), g),), "exact separable 3->4 3x3"),
            FuzzCase(pointwise, (randn((2, 3, 4, 4), g),), "separable 3->4 1x1")]


def _affine_rule(ctx: NodeContext) -> Step:
    return Step.affine(max_abs(ctx.module.scale), "per-channel scale: max|a|")


def _affine_bound(module: ChannelAffine, shape, method: str, label: str) -> float:
    return max_abs(module.scale)


def _fuzz_affine(key: type, g: torch.Generator) -> list[FuzzCase]:
    return [FuzzCase(ChannelAffine(randn((c,), g, 2.0), randn((c,), g)), (randn((2, c) + s, g),), f"{c} channels")
            for c, s in ((3, (5, 5)), (4, ()))]


# --- BatchNorm (eval mode: a per-channel affine map) ------------------------------------------
def _batchnorm_rule(ctx: NodeContext) -> Step:
    m = ctx.module
    if m.training or m.running_var is None:
        raise Unbounded(f"{ctx.label}: {'train-mode ' if m.training else ''}{type(m).__name__} {STATISTICS_REASON}")
    return Step.affine(max_abs(eval_scale(m.running_var, m.weight, m.eps)), "eval BatchNorm: max|gamma / sqrt(var + eps)|")


def _batchnorm_map(module: nn.Module, name: str, in_shape: torch.Size) -> Optional[LinearMap]:
    if module.training or module.running_var is None:
        return None
    return diagonal(eval_scale(module.running_var, module.weight, module.eps), len(in_shape) - 2, name)


def _batchnorm_function_rule(ctx: NodeContext) -> Step:
    var, weight = ctx.arg(2, "running_var"), ctx.arg(3, "weight")
    if ctx.arg(5, "training", False) or not isinstance(var, torch.Tensor):
        raise Unbounded(f"{ctx.label}: batch_norm with batch statistics {STATISTICS_REASON}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise Unbounded(f"{ctx.label}: batch_norm with an input-dependent weight")
    a = eval_scale(var, weight, ctx.arg(7, "eps", 1e-5))
    return Step.affine(max_abs(a), "eval batch_norm: max|gamma / sqrt(var + eps)|")


def _random_stats(bn: nn.Module, g: torch.Generator) -> nn.Module:
    with torch.no_grad():
        if bn.running_var is not None:
            bn.running_mean.copy_(randn(bn.running_mean.shape, g))
            bn.running_var.copy_(randn(bn.running_var.shape, g).abs() + 0.05)
        if bn.weight is not None:
            bn.weight.copy_(randn(bn.weight.shape, g, 2.0))
    return bn.eval()


def _fuzz_batchnorm(key: type, g: torch.Generator) -> list[FuzzCase]:
    shapes = {nn.BatchNorm1d: (2, 3, 5), nn.BatchNorm2d: (2, 3, 4, 4), nn.BatchNorm3d: (2, 3, 3, 3, 3)}
    key = key if key in shapes else nn.BatchNorm2d  # the abstract base: its 2-d class stands in
    return [FuzzCase(_random_stats(key(3), g), (randn(shapes[key], g),), key.__name__)]


def _fuzz_batchnorm_function(key, g: torch.Generator) -> list[FuzzCase]:
    mean, var, w, b = randn((3,), g), randn((3,), g).abs() + 0.05, randn((3,), g, 2.0), randn((3,), g)
    return [FuzzCase(lambda x: F.batch_norm(x, mean, var, w, b, False, 0.1, 1e-5), (randn((2, 3, 4, 4), g),),
                     "F.batch_norm with running statistics")]


# --- Shift: a depthwise conv with fixed one-hot kernels ----------------------------------------
def _shift_geometry(module: Shift) -> ConvGeometry:
    return ConvGeometry(module.weight.detach(), module.channels, module.stride, module.dilation,
                        tuple((p, p) for p in module.padding), "zeros")


def _shift_map(module: Shift, name: str, in_shape: torch.Size) -> Optional[LinearMap]:
    geom = _shift_geometry(module)
    if geom.ndim != len(in_shape) - 2:
        return None
    return LinearMap(geom.dilated_weight().double(), geom.groups, geom.stride, geom.pads, (name,), 1)


def _fuzz_shift(key: type, g: torch.Generator) -> list[FuzzCase]:
    cases = []
    for size, kernel, stride, pad in (((6, 5), (3, 3), (1, 1), (1, 1)), ((7, 6), (3, 3), (2, 2), (1, 1)),
                                      ((9,), (5,), (1,), (2,)), ((3, 4, 3), (3, 3, 3), (1, 1, 1), (1, 1, 1))):
        module = Shift(11, kernel, stride, pad, bias=torch.randn(11, generator=g)).double()
        cases.append(FuzzCase(module, (randn((2, 11) + size, g),), f"{module!r}"))
    return cases


ENTRIES = (
    OpEntry((nn.Linear,), _weighted_rule, _fuzz_linear, linear_map=_linear_map, layer_bound=linear_layer_bound,
            normalization=_normalize_matrix, size_free=True, doc="exact norm; normalized by power iteration"),
    OpEntry(CONVS, _weighted_rule, _fuzz_conv, linear_map=_conv_map, layer_bound=conv_layer_bound,
            normalization=_normalize_conv, size_free=True, doc="FFT/polyphase bound; 1x1 by power iteration"),
    OpEntry((SeparableConv,), _separable_rule, _fuzz_separable, size_free=True, doc="product of its two halves' bounds"),
    OpEntry((ChannelAffine,), _affine_rule, _fuzz_affine, linear_map=lambda m, name, s: diagonal(m.scale, len(s) - 2, name),
            layer_bound=_affine_bound, attribute="scale",
            normalization=lambda m, shapes, k, o, name: DiagonalNormalization(k, o.scaling, o.s_init, name),
            size_free=True, doc="max|scale|"),
    OpEntry((Shift,), constant(1.0, "shift: a one-hot depthwise conv, each input read at most once"), _fuzz_shift,
            linear_map=_shift_map, size_free=True, leaf=True, doc="1 (an isometry away from the border)"),
    OpEntry((_BatchNorm,), _batchnorm_rule, _fuzz_batchnorm, linear_map=_batchnorm_map,
            size_free=True, doc="eval mode: max|gamma / sqrt(var + eps)|"),
    OpEntry((F.batch_norm,), _batchnorm_function_rule, _fuzz_batchnorm_function, doc="running statistics only"),
)
for _entry in ENTRIES:
    table().add(_entry)
