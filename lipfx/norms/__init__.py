"""Operator-norm bounds of single layers (MATH sections 1-5).

Public API:
- :func:`layer_bound` -- sound upper bound on a layer's norm (the registry below dispatches on type);
- :func:`singular_values`, :func:`clip_operator_norm` -- Sedghi et al.'s exact spectrum and its
  projection onto an operator-norm ball;
- :func:`power_iteration` (training), :func:`operator_norm` (test reference): estimates from below.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

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
    "register_layer_bound",
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

BoundRule = Callable[[nn.Module, Optional[tuple[int, ...]], str, str], float]
_RULES: dict[type, BoundRule] = {}


def register_layer_bound(*types: type) -> Callable[[BoundRule], BoundRule]:
    """Register ``rule(module, input_shape, method, label) -> float`` for module types."""

    def deco(rule: BoundRule) -> BoundRule:
        for t in types:
            _RULES[t] = rule
        return rule

    return deco


def layer_bound(
    module: nn.Module,
    input_shape: Optional[Sequence[int]],
    method: str = "auto",
    name: Optional[str] = None,
) -> float:
    """Sound upper bound on the operator norm of ``module``'s linear part (bias ignored).

    Args:
        module: ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups and
            padding_mode), or any type registered with :func:`register_layer_bound`.
        input_shape: one input's shape without the batch dim, e.g. ``(3, 224, 224)``; ``None``
            gives a bound valid at every input size.
        method: ``"auto"`` (the tightest sound method for the layer), ``"fft"`` (circulant
            embedding, polyphase when strided), ``"paper"`` (Runkel et al.'s depthwise bound at
            N+2p, ignoring stride), ``"singla-feizi"`` (2-D, resolution-free) or
            ``"resolution-free"``.
        name: the module's name in its model, used in error messages.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    for cls in type(module).__mro__:
        if cls in _RULES:
            shape = None if input_shape is None else tuple(int(s) for s in input_shape)
            return _RULES[cls](module, shape, method, describe(module, name))
    raise UnsupportedModuleError(
        f"{describe(module, name)}: no operator-norm bound for {type(module).__name__}; "
        f"supported: {', '.join(sorted(t.__name__ for t in _RULES))} "
        "(register more with lipfx.norms.register_layer_bound)"
    )


@register_layer_bound(nn.Linear)
def _linear_rule(module: nn.Linear, shape: Optional[tuple[int, ...]], method: str, label: str) -> float:
    if shape is not None and (len(shape) == 0 or shape[-1] != module.in_features):
        raise ShapeError(f"{label}: expects last input dim {module.in_features}, got input shape {shape}")
    return matrix_norm(module.weight)


@register_layer_bound(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_rule(module: nn.Module, shape: Optional[tuple[int, ...]], method: str, label: str) -> float:
    geom = conv_geometry(module)
    spatial = _spatial(geom, shape, label)
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


def _spatial(geom: ConvGeometry, shape: Optional[tuple[int, ...]], label: str) -> Optional[tuple[int, ...]]:
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
    spatial = _spatial(geom, tuple(input_shape), label)
    return conv_singular_values(geom, spatial, label)
