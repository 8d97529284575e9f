"""Entries for order statistics and vector norms: max / min (over dims, or of two tensors),
sorting and top-k values, and p-norms over dims (docs/math.md, section 8).

Each output of a max over a group depends on its own group only, and |max a - max b| <=
max |a - b| <= ||a - b||_2 on that group; the groups are disjoint, so summing squares the map is
1-Lipschitz. Sorting (and so top-k) is 1-Lipschitz in l2 by the rearrangement inequality. For a
p-norm over groups of n values, | ||a||_p - ||b||_p | <= ||a - b||_p <= n^max(0, 1/p - 1/2) ||a - b||_2.
Indices (argmax, the second output of max(dim) and sort) are integers: the walk refuses them.
"""

from __future__ import annotations

import builtins
import math

import torch

from .context import NodeContext, Step, Unbounded, constant, numel
from .fuzzing import FuzzCase, apply, randn
from .table import OpEntry, key_name, table

_X = (2, 3, 4)


def _max_rule(ctx: NodeContext) -> Step:
    # max(x), max(x, dim), or the elementwise max(x, other) with a tensor second argument
    other = ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.node.kwargs.get("other")
    if isinstance(ctx.value(other), torch.Tensor) or ctx.depends(other):
        from .activations import _clamp_rule  # the elementwise form: 1 in each argument

        return _clamp_rule(ctx)
    return Step.scale(1.0, "max / min over groups: 1")


def _max_cases(key, g: torch.Generator) -> list[FuzzCase]:
    out = [FuzzCase(apply(key), (randn(_X, g),), "all elements"),
           FuzzCase(lambda x: apply(key, 1)(x)[0], (randn(_X, g),), "values over dim 1"),
           FuzzCase(lambda x: apply(key, -1, True)(x).values, (randn(_X, g),), "values, keepdim")]
    if key in (torch.max, torch.min, "max", "min"):
        out.append(FuzzCase(apply(key), (randn(_X, g), randn(_X, g)), "two tensors"))
    return out


def _amax_cases(key, g: torch.Generator) -> list[FuzzCase]:
    return [FuzzCase(apply(key, dim), (randn(_X, g),), f"dim {dim}") for dim in (1, (0, 2), -1)]


def _sort_cases(key, g: torch.Generator) -> list[FuzzCase]:
    if key_name(key) == "topk":
        return [FuzzCase(lambda x: apply(key, 2)(x)[0], (randn(_X, g),), "top-2 values")]
    return [FuzzCase(lambda x: apply(key, 1)(x)[0], (randn(_X, g),), "sorted along dim 1"),
            FuzzCase(lambda x: apply(key, descending=True)(x).values, (randn(_X, g),), "descending")]


def _norm_rule(ctx: NodeContext) -> Step:
    # torch.norm(x, p='fro', dim=None, ...), x.norm(p, dim), torch.linalg.vector_norm(x, ord=2, dim=None)
    vector = ctx.node.target is torch.linalg.vector_norm
    p = ctx.arg(1, "ord" if vector else "p", 2 if vector else "fro")
    p = 2.0 if p == "fro" else p
    if isinstance(p, str) or not (isinstance(p, (int, float)) and p >= 1):
        raise Unbounded(f"{ctx.label}: the {p!r}-norm has no rule (p >= 1 do)")
    n = numel(ctx.shape()) / max(numel(ctx.out_shape), 1)  # values per norm
    factor = n ** max(0.0, 1.0 / p - 0.5) if math.isfinite(p) else 1.0
    return Step.scale(factor, f"{p:g}-norm over groups of {n:g}: n^max(0, 1/p - 1/2)")


def _norm_cases(key, g: torch.Generator) -> list[FuzzCase]:
    if key is torch.linalg.vector_norm:
        calls = [((), {}), ((1,), dict(dim=-1)), ((3.0,), dict(dim=(1, 2)))]
    else:
        calls = [((), {}), ((2, 1), {}), ((1, -1), {}), ((float("inf"), 1), {})]
    return [FuzzCase(apply(key, *a, **kw), (randn(_X, g),), f"{a} {kw}") for a, kw in calls]


def _attribute_rule(ctx: NodeContext) -> Step:
    name = ctx.node.args[1]
    if name in ("values", "T", "mT"):  # max(dim).values, sort(...).values; transposes
        return Step.affine(1.0, f".{name}: norm 1")
    raise Unbounded(f"{ctx.label}: no rule for the attribute .{name}")


def _attribute_cases(key, g: torch.Generator) -> list[FuzzCase]:
    return [FuzzCase(lambda x: x.T, (randn((3, 4), g),), ".T"),
            FuzzCase(lambda x: torch.sort(x).values, (randn(_X, g),), ".values")]


ENTRIES = (
    OpEntry((torch.max, torch.min, "max", "min"), _max_rule, _max_cases, doc="1 (elementwise form: l2 of 1s)"),
    OpEntry((torch.amax, torch.amin, "amax", "amin"), constant(1.0, "max / min over groups: 1"), _amax_cases,
            doc="1"),
    OpEntry((torch.sort, "sort", torch.topk, "topk"), constant(1.0, "sorted values: 1 (rearrangement)"), _sort_cases,
            doc="1"),
    OpEntry((torch.norm, "norm", torch.linalg.vector_norm), _norm_rule, _norm_cases, doc="n^max(0, 1/p - 1/2)"),
    OpEntry((builtins.getattr,), _attribute_rule, _attribute_cases, doc=".values, .T: 1"),
)
for _entry in ENTRIES:
    table().add(_entry)
