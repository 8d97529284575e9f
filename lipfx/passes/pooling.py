"""Replace global average pooling by global l2 pooling (``convert(..., pooling="l2")``).

A global average over H x W positions has norm 1/sqrt(H W): it throws away most of a norm-1
network's budget just before the classifier. :class:`lipfx.layers.L2Pool` keeps the norm. Every
node that averages over all spatial dims is replaced: ``AdaptiveAvgPool{1,2,3}d`` with output
size 1, ``F.adaptive_avg_pool*d(x, 1)`` and ``x.mean(dims)`` / ``torch.mean(x, dims)`` over
exactly the dims after the first two (on a 3-D tensor that is dim 2, as for Conv1d features).
Which nodes those are is decided from the shapes ``lipfx.convert`` recorded, not from names. A
mean whose result is combined with its own input (centring, ``x - x.mean(...)``) is not pooling
and is left alone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ArgumentError
from ..layers import L2Pool
from .graph_utils import replace_with_module
from .report import ConversionReport

POOLINGS = ("l2",)
_ADAPTIVE_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)


def replace_global_pooling(gm: fx.GraphModule, pooling: str, report: Optional[ConversionReport] = None) -> int:
    """Put an :class:`L2Pool` in place of every global average pooling of ``gm``, in place;
    returns how many were replaced. Needs ``node.meta['tensor_meta']``."""
    if pooling not in POOLINGS:
        raise ArgumentError(f"unknown pooling {pooling!r}; choose from {POOLINGS} or None")
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        found = _global_average(node, modules)
        if found is None:
            continue
        source, keepdim, label = found
        replace_with_module(gm, node, f"l2pool_{node.name}", L2Pool(keepdim), source)
        if report is not None:
            report.add(label, "pooling-l2", f"{label} -> L2Pool")
        count += 1
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return count


def _shape(node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _global_average(node: fx.Node, modules: dict) -> Optional[tuple[fx.Node, bool, str]]:
    """(input, keepdim, label) when ``node`` averages its input over every spatial dim."""
    if node.op == "call_module" and isinstance(modules.get(node.target), _ADAPTIVE_MODULES):
        label = str(node.target)
    elif node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
        label = f"{node.name} ({node.target.__name__})"
    elif (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
        label = f"{node.name} (mean)"
    else:
        return None
    source = node.args[0] if node.args else node.kwargs.get("input")
    shape_in, shape_out = _shape(source), _shape(node)
    if shape_in is None or shape_out is None or len(shape_in) < 3:
        return None
    if label.endswith("(mean)") and node.kwargs.get("dtype") is not None:
        return None  # a cast besides the average: leave it alone
    batch_channels = tuple(shape_in[:2])
    spatial_ones = batch_channels + (1,) * (len(shape_in) - 2)
    if tuple(shape_out) == spatial_ones:
        keepdim = True
    elif tuple(shape_out) == batch_channels and label.endswith("(mean)"):
        keepdim = False
    else:
        return None  # not global, or not over the spatial dims
    if label.endswith("(mean)") and not _means_spatial(node, len(shape_in)):
        return None
    if any(source in user.all_input_nodes for user in node.users):
        return None  # x - x.mean(...) and the like: centring, not pooling
    return source, keepdim, label


def _means_spatial(node: fx.Node, ndim: int) -> bool:
    """A mean reduces exactly dims 2..ndim-1 (the shapes alone cannot tell dim 1 of size 1 apart)."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        return False
    return sorted(d % ndim for d in dims) == list(range(2, ndim))
