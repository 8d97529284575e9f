"""``lipfx.layer_bound``: one layer's operator norm, from the ``layer_bound`` piece of its entry."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from ..errors import ArgumentError, UnsupportedModuleError
from ..norms import METHODS
from ..norms.geometry import describe
from .table import entries, lookup


def layer_bound(
    module: nn.Module,
    input_shape: Optional[Sequence[int]],
    method: str = "auto",
    name: Optional[str] = None,
) -> float:
    """Sound upper bound on the operator norm of ``module``'s linear part (bias ignored).

    Args:
        module: ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups and
            padding_mode), ``ChannelAffine``, or any type whose op table entry has a
            ``layer_bound`` piece (:func:`lipfx.ops.register`).
        input_shape: one input's shape without the batch dim, e.g. ``(3, 224, 224)``; ``None``
            gives a bound valid at every input size.
        method: ``"auto"`` (the tightest sound method for the layer), ``"fft"`` (circulant
            embedding, polyphase when strided), ``"paper"`` (Runkel et al.'s depthwise bound at
            N+2p, ignoring stride), ``"singla-feizi"`` (2-D, resolution-free) or
            ``"resolution-free"``.
        name: the module's name in its model, used in error messages.
    """
    if method not in METHODS:
        raise ArgumentError(f"unknown method {method!r}; choose from {METHODS}")
    entry = lookup(type(module))
    if entry is None or entry.layer_bound is None:
        supported = sorted({k.__name__ for e in entries() if e.layer_bound is not None for k in e.keys})
        raise UnsupportedModuleError(
            f"{describe(module, name)}: no operator-norm bound for {type(module).__name__}; "
            f"supported: {', '.join(supported)} (add a layer_bound piece with lipfx.ops.register)"
        )
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    return entry.layer_bound(module, shape, method, describe(module, name))
