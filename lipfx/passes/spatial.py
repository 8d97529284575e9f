"""Replace depthwise convs by parameter-free spatial shifts (``convert(..., spatial="shift")``).

A depthwise conv that preserves the norm of every input must be a shift (its frequency response
has modulus 1 everywhere, and a finite kernel with that property is a single tap). With
``separable="fresh"`` every conv becomes a depthwise conv (multiplier 1) followed by a pointwise
one; replacing the depthwise halves by :class:`lipfx.layers.Shift` and holding the pointwise
halves orthogonal (``constraint="orthogonal"``) gives LipNeXt's family of networks. Depthwise
convs with a channel multiplier above 1, or with non-zero padding modes, are left as they are
(a shift of each copy would have norm sqrt(multiplier)) and the report says so.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
from torch import nn

from ..errors import ArgumentError
from ..layers import Shift
from .graph_utils import replace_submodule
from .report import ConversionReport

SPATIAL = ("shift",)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def replace_depthwise(gm: fx.GraphModule, spatial: str, report: Optional[ConversionReport] = None) -> int:
    """Put a :class:`Shift` in place of every depthwise conv (groups = in = out channels) that
    ``gm`` calls, in place; returns how many were replaced."""
    if spatial not in SPATIAL:
        raise ArgumentError(f"unknown spatial {spatial!r}; choose from {SPATIAL} or None")
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        conv = gm.get_submodule(node.target)
        if type(conv) not in _CONVS or conv.groups == 1 or conv.groups != conv.in_channels:
            continue
        name = str(node.target)
        if conv.out_channels != conv.in_channels or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            if report is not None:
                why = "a channel multiplier" if conv.out_channels != conv.in_channels else "its padding"
                report.add(name, "spatial-kept", f"depthwise conv kept: {why} (a shift needs multiplier 1, zero padding)")
            continue
        shift = Shift(conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.bias)
        replace_submodule(gm, name, shift.to(conv.weight.device))
        if report is not None:
            report.add(name, "spatial-shift", repr(shift))
        count += 1
    gm.recompile()
    return count
