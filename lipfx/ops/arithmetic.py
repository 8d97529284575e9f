"""Entries for arithmetic: sums (the triangle inequality), products and quotients by constants,
matrix products with constant matrices, concatenation (sqrt of the sum of squares), and the
products of two input-dependent tensors that have no global constant (attention, gates, bilinear).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..norms.conv import matrix_norm
from ..norms.spectral import RELATIVE_SLACK
from .context import NodeContext, Step, Unbounded, broadcast_factor, max_abs, unbounded
from .fuzzing import FuzzCase, apply, randn
from .table import OpEntry, key_name, table

PRODUCT_REASON = (
    "product of two input-dependent tensors (attention, a squeeze-excitation or other gate): "
    "not globally Lipschitz"
)
ATTENTION_REASON = "attention softmax(QK^T)V multiplies input-dependent tensors: not globally Lipschitz"
_X = (2, 3, 4)


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


def _product(ctx: NodeContext) -> Step:
    raise Unbounded(f"{ctx.label}: {PRODUCT_REASON}")


def _max_abs_value(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return max_abs(value.double())
    return abs(float(value))


def _mul(ctx: NodeContext) -> Step:
    a, b = ctx.node.args[0], ctx.node.args[1]
    if ctx.depends(a) and ctx.depends(b):
        _product(ctx)
    dep, const = (a, b) if ctx.depends(a) else (b, a)
    c = _max_abs_value(ctx.value(const))
    return Step.affine(c * broadcast_factor(ctx.shape(dep), ctx.out_shape), "times a constant: max|c|")


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
    return Step.affine(factor, "divided by a constant: 1/min|c|")


def _matmul(ctx: NodeContext) -> Step:
    a, b = ctx.node.args[0], ctx.node.args[1]
    if ctx.depends(a) and ctx.depends(b):
        _product(ctx)
    const = ctx.value(b if ctx.depends(a) else a)
    if not isinstance(const, torch.Tensor) or const.dim() > 2:
        raise Unbounded(f"{ctx.label}: matmul with a batched or non-tensor constant has no rule")
    return Step.affine(matrix_norm(const.reshape(-1, 1) if const.dim() == 1 else const), "times a constant matrix: exact norm")


def _linear_function(ctx: NodeContext) -> Step:
    if ctx.depends(ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.node.kwargs.get("weight")):
        _product(ctx)
    return Step.affine(matrix_norm(ctx.arg(1, "weight")), "exact norm")


def _concat(ctx: NodeContext) -> Step:
    # the parts are disjoint blocks of the output: L = sqrt(sum L_i^2)
    return Step(tuple(1.0 for _ in ctx.inputs), "concatenation: sqrt(sum of squares)", combine="l2", linear=True)


def _binary_cases(key, g: torch.Generator) -> list[FuzzCase]:
    """Two inputs (broadcasting too), an input and a constant on either side, and alpha."""
    name = key_name(key)
    c = randn((1, 3, 1), g, 2.0)
    out = [FuzzCase(apply(key), (randn(_X, g), randn(_X, g)), "two inputs"),
           FuzzCase(apply(key), (randn(_X, g), randn((3, 1), g)), "broadcast input"),
           FuzzCase(lambda x: apply(key)(x, c), (randn(_X, g),), "input and constant")]
    if not name.endswith("_") and not name.startswith("__"):
        out.append(FuzzCase(lambda x: apply(key)(c.expand(_X).clone(), x), (randn(_X, g),), "constant and input"))
    if key in (torch.add, torch.sub, torch.subtract, "add", "sub"):
        out.append(FuzzCase(lambda x, y: apply(key, alpha=-2.5)(x, y), (randn(_X, g), randn(_X, g)), "alpha=-2.5"))
    return out


def _scaled_cases(key, g: torch.Generator) -> list[FuzzCase]:
    """An input times or over a constant (scalar, broadcast tensor, negative entries)."""
    c = randn((1, 3, 1), g, 2.0).abs() + 0.3
    c[0, 1, 0] *= -1
    return [FuzzCase(lambda x: apply(key)(x, c), (randn(_X, g),), "broadcast constant"),
            FuzzCase(lambda x: apply(key)(x, -2.5), (randn(_X, g),), "scalar -2.5")]


def _matmul_cases(key, g: torch.Generator) -> list[FuzzCase]:
    w = randn((4, 5), g)
    if key_name(key) == "bmm":
        return []  # a batched constant has no rule (unbounded): nothing to compare
    out = [FuzzCase(lambda x: apply(key)(x, w), (randn((3, 4), g),), "x @ W")]
    if not isinstance(key, str):  # a constant's method called on an input is not a call_method node
        out.append(FuzzCase(lambda x: apply(key)(w.T.contiguous(), x), (randn((4, 2), g),), "W @ x"))
    return out


def _linear_function_cases(key, g: torch.Generator) -> list[FuzzCase]:
    w, b = randn((5, 4), g), randn((5,), g)
    return [FuzzCase(lambda x: F.linear(x, w, b), (randn((3, 4), g),), "F.linear")]


def _concat_cases(key, g: torch.Generator) -> list[FuzzCase]:
    dim = {"stack": 0, "hstack": None, "vstack": None}.get(key_name(key), 1)
    call = (lambda *xs: key(list(xs))) if dim is None else (lambda *xs: key(list(xs), dim))
    return [FuzzCase(call, (randn(_X, g), randn(_X, g)), "two inputs"),
            FuzzCase(lambda x: call(x, x), (randn(_X, g),), "one input twice")]


def _unbounded_cases(key, g: torch.Generator) -> list[FuzzCase]:
    return []  # an unbounded op certifies as inf: no finite claim to check


ENTRIES = (
    OpEntry((operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"), _add_sub(1.0),
            _binary_cases, sum_sign=1.0, size_free=True, doc="triangle inequality"),
    OpEntry((operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", "__sub__"), _add_sub(-1.0),
            _binary_cases, sum_sign=-1.0, size_free=True, doc="triangle inequality"),
    OpEntry((operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "__mul__", "__rmul__"), _mul,
            _scaled_cases, doc="max|c| for a constant c"),
    OpEntry((operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "__truediv__"), _div,
            _scaled_cases, doc="1/min|c| for a constant c"),
    OpEntry((operator.matmul, torch.matmul, torch.mm, torch.bmm, "matmul", "mm", "__matmul__"), _matmul,
            _matmul_cases, doc="||W|| for a constant matrix W"),
    OpEntry((F.linear,), _linear_function, _linear_function_cases, doc="||W||"),
    OpEntry((torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack), _concat,
            _concat_cases, doc="sqrt(sum of squares)"),
    OpEntry((nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Transformer,
             F.scaled_dot_product_attention, F.multi_head_attention_forward), unbounded(ATTENTION_REASON),
            _unbounded_cases, doc="unbounded"),
    OpEntry((nn.Bilinear,), unbounded(PRODUCT_REASON), _unbounded_cases, doc="unbounded"),
)
for _entry in ENTRIES:
    table().add(_entry)
