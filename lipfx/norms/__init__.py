"""Operator-norm bounds of single layers (docs/math.md, sections 1-5).

Public API:
- :func:`layer_bound` -- sound upper bound on a layer's norm (dispatched through the op table,
  :mod:`lipfx.ops`, to :func:`linear_layer_bound` / :func:`conv_layer_bound` or a user's piece);
- :func:`singular_values`, :func:`clip_operator_norm` -- Sedghi et al.'s exact spectrum and its
  projection onto an operator-norm ball;
- :func:`power_iteration` (training), :func:`operator_norm` (test reference): estimates from below.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ShapeError, UnsupportedModuleError
from .clip import clip_operator_norm
from .conv import (
    conv_bound,
    conv_singular_values,
    matrix_norm,
    paper_bound,
    resolution_free_bound,
    singla_feizi_bound,
    zero_padded_bound,
)
from .estimators import PowerIterationResult, operator_norm, power_iteration
from .geometry import ConvGeometry, conv_geometry, describe

__all__ = [
    "layer_bound",
    "linear_layer_bound",
    "register_layer_bound",
    "conv_layer_bound",
    "singular_values",
    "clip_operator_norm",
    "power_iteration",
    "PowerIterationResult",
    "operator_norm",
    "conv_geometry",
    "ConvGeometry",
    "METHODS",
]

METHODS = ("auto", "fft", "paper", "singla-feizi", "resolution-free")


def linear_layer_bound(module: nn.Linear, shape: Optional[tuple[int, ...]], method: str, label: str) -> float:
    """Exact norm of a linear layer's weight (the ``layer_bound`` piece of its op table entry)."""
    if shape is not None and (len(shape) == 0 or shape[-1] != module.in_features):
        raise ShapeError(f"{label}: expects last input dim {module.in_features}, got input shape {shape}")
    return matrix_norm(module.weight)


def conv_layer_bound(module: nn.Module, shape: Optional[tuple[int, ...]], method: str, label: str) -> float:
    """Sound bound on a conv's norm by ``method`` (the ``layer_bound`` piece of its op table entry)."""
    geom = conv_geometry(module)
    spatial = spatial_size(geom, shape, label)
    if method == "singla-feizi":
        if geom.ndim != 2:
            raise UnsupportedModuleError(f"{label}: method 'singla-feizi' is defined for Conv2d only")
        return singla_feizi_bound(geom)
    if method == "resolution-free" or spatial is None:
        if method in ("fft", "paper"):
            raise ShapeError(f"{label}: method {method!r} needs an input_shape")
        return resolution_free_bound(geom)
    geom.check_input(spatial, label)
    if method == "paper":
        return paper_bound(geom, spatial)
    if method == "fft" and geom.padding_mode == "zeros":
        return zero_padded_bound(geom, spatial)
    return conv_bound(geom, spatial, label)


def spatial_size(geom: ConvGeometry, shape: Optional[tuple[int, ...]], label: str) -> Optional[tuple[int, ...]]:
    if shape is None:
        return None
    if len(shape) != geom.ndim + 1:
        raise ShapeError(
            f"{label}: expects input shape (C, {', '.join('N' * geom.ndim)}) without batch dim, got {shape}"
        )
    if shape[0] != geom.in_channels:
        raise ShapeError(f"{label}: expects {geom.in_channels} input channels, got input shape {shape}")
    return shape[1:]


def singular_values(conv: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """All singular values, descending, by FFT and batched SVD (Sedghi et al. 2019).

    For circular padding whose outputs are a full circulant (unit stride, or a stride dividing
    the size) these are exactly the conv's singular values; for zero padding they are those of
    the circulant embedding on the smallest grid without wrap-around (their max bounds the norm).
    """
    geom = conv_geometry(conv)
    label = describe(conv)
    spatial = spatial_size(geom, tuple(input_shape), label)
    return conv_singular_values(geom, spatial, label)


def register_layer_bound(*types: type):
    """Deprecated: give the op table entry of ``types`` a ``layer_bound`` piece instead
    (``lipfx.ops.register(T, rule=..., fuzz=..., layer_bound=...)``). Kept for one release: it adds
    the piece to each type's entry (an entry with a chain-rule rule from the bound if it has none)."""
    import warnings

    from ..ops.context import Step
    from ..ops.table import OpEntry, lookup, table

    warnings.warn("lipfx.norms.register_layer_bound is deprecated: use lipfx.ops.register(..., layer_bound=...)",
                  DeprecationWarning, stacklevel=2)

    def deco(rule):
        for t in types:
            entry = lookup(t)
            if entry is None:
                def chain(ctx, rule=rule):
                    shape = tuple(ctx.shape()[1:])
                    return Step.affine(rule(ctx.module, shape, ctx.method, describe(ctx.module, ctx.module_name)),
                                       "registered layer bound")

                entry = OpEntry((t,), chain, leaf=not t.__module__.startswith("torch."))
            table().add(OpEntry((t,), entry.rule, entry.fuzz, entry.linear_map, rule, entry.normalization,
                                entry.attribute, entry.sum_sign, entry.size_free, entry.leaf, entry.doc))
        return rule

    return deco


def __getattr__(name: str):
    # layer_bound dispatches through the op table, which imports this package: bind it lazily
    if name == "layer_bound":
        from ..ops.bounds import layer_bound

        return layer_bound
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
