"""Entries for shape ops: reshapes, permutations and selections (norm 1), indexing with repeats
and broadcasting copies (sqrt(copies)), and reductions (sum: sqrt(n), mean: 1/sqrt(n)).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .context import NodeContext, Step, Unbounded, broadcast_factor, constant, numel
from .fuzzing import FuzzCase, apply, randn
from .table import OpEntry, key_name, table

_RESHAPE = "reshape/permute/select: norm 1"
_X = (2, 3, 4)  # the input most shape ops are fuzzed at
_ARGS: dict[str, tuple] = {  # legal arguments after the input, by op name; input shape when not _X
    "reshape": ((-1,),), "view": ((-1,),), "permute": ((1, 0, 2),), "transpose": (0, 2), "swapaxes": (0, 2),
    "unsqueeze": (1,), "chunk": (2,), "split": (2,), "narrow": (2, 1, 2), "movedim": (0, 2), "roll": (1, 2),
    "flip": ((0, 2),), "unflatten": (2, (2, 2)), "to": (torch.float64,), "channel_shuffle": (2,),
    "pixel_shuffle": (2,), "pixel_unshuffle": (2,), "PixelShuffle": (2,), "PixelUnshuffle": (2,),
    "ChannelShuffle": (2,), "Unflatten": (2, (2, 2)),
}
_SHAPES = {"t": (3, 4), "channel_shuffle": (2, 4, 3, 3), "ChannelShuffle": (2, 4, 3, 3), "pixel_shuffle": (2, 8, 3, 3),
           "PixelShuffle": (2, 8, 3, 3), "pixel_unshuffle": (2, 2, 4, 4), "PixelUnshuffle": (2, 2, 4, 4)}


_SHAPE_ONLY = {"view_as", "reshape_as", "type_as", "expand_as", "to"}  # the second argument gives only a shape/dtype


def _value_step(ctx: NodeContext, factor: float, method: str) -> Step:
    """``factor`` for the tensor the op moves (its first argument), 0 for shape-only arguments
    (``x.view_as(y)``: y's values do not matter); any other input-dependent argument has no rule."""
    first = ctx.node.args[0] if ctx.node.args else None
    name = ctx.node.target if ctx.node.op == "call_method" else None
    factors = []
    for i, node in enumerate(ctx.inputs):
        if node is first and i == ctx.inputs.index(first):
            factors.append(factor)
        elif name in _SHAPE_ONLY:
            factors.append(0.0)
        else:
            raise Unbounded(f"{ctx.label}: an input-dependent argument other than the tensor it moves")
    return Step(tuple(factors), method, linear=True)


def _reshape_rule(ctx: NodeContext) -> Step:
    return _value_step(ctx, 1.0, _RESHAPE)


def _reshape_cases(key, g: torch.Generator) -> list[FuzzCase]:
    name = key_name(key)
    shape = _SHAPES.get(name, _X)
    if name in ("view_as", "reshape_as", "type_as"):
        target = torch.zeros(24 if name != "type_as" else 1, dtype=torch.float64)
        return [FuzzCase(apply(key, target), (randn(shape, g),), f"{name}(a constant)"),
                FuzzCase(lambda x, y: getattr(x, name)(y.reshape(-1) if name != "type_as" else y), (randn(shape, g), randn(shape, g)),
                         f"{name}(another input): shape only")]
    rtol = 1e-3 if name == "float" else 1e-6  # float32 rounding of the outputs shows in the secants
    return [FuzzCase(apply(key, *_ARGS.get(name, ())), (randn(shape, g),), name, rtol)]


def _getitem_cases(key, g: torch.Generator) -> list[FuzzCase]:
    indices = [(slice(None), 1), (Ellipsis, slice(None, None, 2)), (slice(None), [0, 2, 2]),
               (slice(None), torch.tensor([1, 1, 0, 1])), (0, slice(1, 3), None), (slice(None), [2, -1]),
               ([[0, 1], [1, -1]],), (slice(None), [0, -3], [1, -3]), (Ellipsis, torch.tensor([True, False, True, True])),
               (-1, slice(-2, None))]
    return [FuzzCase(lambda x, i=i: x[i], (randn(_X, g),), f"x[{i}]") for i in indices]


def _getitem(ctx: NodeContext) -> Step:
    obj, index = ctx.node.args[0], ctx.node.args[1]
    if ctx.depends(index) or _contains_dependent(ctx, index):
        raise Unbounded(f"{ctx.label}: indexing with input-dependent indices is not continuous")
    if not isinstance(ctx.shapes.get(obj), torch.Size):
        return Step.affine(1.0, "item of a tuple: norm <= 1")
    # the selection applied to the elements' own positions: how often each one is copied, exact
    # for any index (negative, nested, broadcast advanced indices, masks, Ellipsis, None)
    positions = torch.arange(numel(ctx.shapes[obj])).reshape(ctx.shapes[obj])
    picked = positions[ctx.value(index)].reshape(-1)
    copies = int(torch.bincount(picked).max()) if picked.numel() else 1
    method = "selection: norm 1" if copies <= 1 else "indexing with repeats: sqrt(most copies)"
    return Step.affine(math.sqrt(max(copies, 1)), method)


def _contains_dependent(ctx: NodeContext, index: Any) -> bool:
    if isinstance(index, (list, tuple)):
        return any(_contains_dependent(ctx, i) for i in index)
    if isinstance(index, slice):
        return any(ctx.depends(v) for v in (index.start, index.stop, index.step))
    return ctx.depends(index)


def _copies(ctx: NodeContext) -> Step:
    return _value_step(ctx, broadcast_factor(ctx.shape(ctx.node.args[0]), ctx.out_shape), "copies elements: sqrt(copies)")


def _copies_cases(key, g: torch.Generator) -> list[FuzzCase]:
    args = {"expand": (2, 3, 4), "repeat": (1, 2, 1), "tile": ((1, 2),), "broadcast_to": ((2, 3, 4),)}
    name = key_name(key)
    if name == "expand_as":
        return [FuzzCase(apply(key, torch.zeros(2, 3, 4, dtype=torch.float64)), (randn((2, 1, 4), g),), name),
                FuzzCase(lambda x, y: x.expand_as(y), (randn((2, 1, 4), g), randn((2, 3, 4), g)), "expand_as(input)")]
    return [FuzzCase(apply(key, *args[name]), (randn((2, 1, 4), g),), name)]


def _repeat_interleave(ctx: NodeContext) -> Step:
    repeats = ctx.arg(1, "repeats")
    if isinstance(repeats, torch.Tensor) and repeats.numel() > 1:
        return Step.affine(math.sqrt(float(repeats.max())), "copies elements: sqrt(most copies)")
    return _copies(ctx)


def _repeat_interleave_cases(key, g: torch.Generator) -> list[FuzzCase]:
    calls = [(2, 1), (torch.tensor([1, 3, 2]), 1)]
    return [FuzzCase(apply(key, *a), (randn(_X, g),), f"repeats {a[0]}") for a in calls]


def _reduction(kind: str) -> Callable[[NodeContext], Step]:
    def rule(ctx: NodeContext) -> Step:
        n = numel(ctx.shape()) / max(numel(ctx.out_shape), 1)  # values reduced into each output
        if kind == "mean":
            return Step.affine(1.0 / math.sqrt(n), "mean of n values: 1/sqrt(n)")
        return Step.affine(math.sqrt(n), "sum of n values: sqrt(n)")

    return rule


def _reduction_cases(key, g: torch.Generator) -> list[FuzzCase]:
    calls = [(), (1,), ((1, 2), True)]
    return [FuzzCase(apply(key, *a), (randn(_X, g),), f"dims {a}") for a in calls]


ENTRIES = (
    OpEntry((nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, torch.flatten,
             torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.squeeze, torch.unsqueeze,
             torch.chunk, torch.split, torch.unbind, torch.narrow, torch.movedim, torch.roll, torch.flip, torch.t,
             torch.clone, torch.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle, operator.neg, operator.pos,
             torch.neg, torch.unflatten, "view", "reshape", "flatten", "unflatten", "permute", "transpose",
             "swapaxes", "t", "contiguous", "squeeze", "unsqueeze", "view_as", "reshape_as", "narrow", "movedim",
             "chunk", "split", "unbind", "to", "float", "double", "clone", "detach", "type_as", "roll", "flip",
             "neg", "__neg__"), _reshape_rule, _reshape_cases, size_free=True, doc="norm 1"),
    OpEntry((torch.abs, operator.abs, "abs"), constant(1.0, "|x|: 1-Lipschitz"), _reshape_cases, size_free=True, doc="1"),
    OpEntry((operator.getitem,), _getitem, _getitem_cases, doc="1, or sqrt(most copies) for repeated indices"),
    OpEntry(("expand", "expand_as", "repeat", "tile", "broadcast_to", torch.tile, torch.broadcast_to), _copies,
            _copies_cases, doc="sqrt(copies)"),
    OpEntry((torch.repeat_interleave, "repeat_interleave"), _repeat_interleave, _repeat_interleave_cases,
            doc="sqrt(most copies)"),
    OpEntry((torch.mean, "mean"), _reduction("mean"), _reduction_cases, doc="1/sqrt(n)"),
    OpEntry((torch.sum, "sum"), _reduction("sum"), _reduction_cases, doc="sqrt(n)"),
)
for _entry in ENTRIES:
    table().add(_entry)
