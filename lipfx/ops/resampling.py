"""Entries for resampling and padding: interpolation's exact norm (a product of 1-D maps) and
padding's sqrt(most copies of one element) (docs/math.md, section 8).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..norms.geometry import padding_multiplicity
from .context import NodeContext, Step, as_tuple
from .fuzzing import FuzzCase, apply, randn
from .pooling import _separable_norm
from .table import OpEntry, table


def _interpolation_factor(ctx: NodeContext, size, scale_factor, mode, align_corners, recompute, antialias) -> Step:
    in_shape, out_shape = ctx.shape(), ctx.out_shape
    d = len(in_shape) - 2
    in_sp, out_sp = tuple(in_shape[2:]), tuple(out_shape[2:])
    use_size = size is not None or recompute or scale_factor is None
    scales = as_tuple(scale_factor, d) if scale_factor is not None else None
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

    return Step.affine(_separable_norm(in_sp, one_dim), f"interpolation ({mode}): exact norm (product of 1-D maps)")


def _pad_factor(ctx: NodeContext, pad: Sequence[int], mode: str) -> Step:
    if mode in ("constant", "zeros"):
        return Step.affine(1.0, "constant padding: norm 1")
    shape = ctx.shape()
    count = 1
    for j in range(len(pad) // 2):  # pad lists the last dim first
        n = int(shape[-1 - j])
        count *= padding_multiplicity(mode, n, max(pad[2 * j], 0), max(pad[2 * j + 1], 0))
    return Step.affine(math.sqrt(count), f"{mode} padding: sqrt(most copies of one element)")


def _interpolate_rule(ctx: NodeContext) -> Step:
    m = ctx.module
    if m is not None:
        return _interpolation_factor(ctx, m.size, m.scale_factor, m.mode, m.align_corners,
                                     getattr(m, "recompute_scale_factor", None), False)
    return _interpolation_factor(ctx, ctx.arg(1, "size"), ctx.arg(2, "scale_factor"), ctx.arg(3, "mode", "nearest"),
                                 ctx.arg(4, "align_corners"), ctx.arg(5, "recompute_scale_factor"),
                                 ctx.arg(6, "antialias", False))


def _interpolate_cases(key, g: torch.Generator) -> list[FuzzCase]:
    calls = [dict(scale_factor=2, mode="nearest"), dict(size=(7, 3), mode="bilinear", align_corners=False),
             dict(scale_factor=1.5, mode="bicubic", align_corners=True), dict(size=(3, 2), mode="area")]
    if key is F.interpolate:
        calls.append(dict(size=(3, 4), mode="bilinear", antialias=True))
    return [FuzzCase(apply(key, **kw), (randn((2, 3, 5, 4), g),), str(kw)) for kw in calls]


_PAD_MODES = {"Zero": "constant", "Constant": "constant", "Reflection": "reflect", "Replication": "replicate",
              "Circular": "circular"}
_PAD_MODULES = tuple(getattr(nn, f"{p}Pad{d}d") for p in _PAD_MODES for d in (1, 2, 3) if hasattr(nn, f"{p}Pad{d}d"))


def _pad_rule(ctx: NodeContext) -> Step:
    if ctx.module is None:
        return _pad_factor(ctx, ctx.arg(1, "pad"), ctx.arg(2, "mode", "constant"))
    mode = next(v for k, v in _PAD_MODES.items() if type(ctx.module).__name__.startswith(k))
    return _pad_factor(ctx, ctx.module.padding, mode)


def _pad_cases(key, g: torch.Generator) -> list[FuzzCase]:
    if key is F.pad:
        calls = [((1, 2, 0, 1), dict(mode=m)) for m in ("constant", "reflect", "replicate", "circular")]
        calls.append(((2, 2, 2, 2), dict(mode="reflect")))
        return [FuzzCase(apply(key, a, **kw), (randn((2, 3, 5, 4), g),), f"{a} {kw}") for a, kw in calls]
    d = int(key.__name__[-2])
    args = (2,) if not key.__name__.startswith("Constant") else (2, 1.5)
    return [FuzzCase(apply(key, *args), (randn((2, 3) + (4,) * d, g),), key.__name__)]


ENTRIES = (
    OpEntry((nn.Upsample, F.interpolate), _interpolate_rule, _interpolate_cases, doc="exact norm: product of 1-D maps"),
    OpEntry(_PAD_MODULES + (F.pad,), _pad_rule, _pad_cases, doc="sqrt(most copies of one element)"),
)
for _entry in ENTRIES:
    table().add(_entry)
