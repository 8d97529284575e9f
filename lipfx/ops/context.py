"""What a certificate rule sees and returns (docs/math.md, section 8).

A rule sees one graph node through a :class:`NodeContext` and returns a :class:`Step`: how the
node's bound follows from the bounds of its input-dependent inputs. Ops with no global Lipschitz
constant raise :class:`Unbounded` with the reason. Nodes that do not depend on the network input
(parameters, shapes, constants) never reach a rule: their bound is 0. Rules are pieces of the
op table's entries (:mod:`lipfx.ops.table`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from ..norms.spectral import RELATIVE_SLACK
from ..passes.graph_utils import innermost_module

COMBINES = ("sum", "l2")


class Unbounded(Exception):
    """Raised by a rule for an op that has no global Lipschitz constant; the message is the reason."""


@dataclass(frozen=True)
class Step:
    """L(node) = combine_i(factors[i] * L(inputs[i])) over the node's input-dependent inputs.

    ``sum`` is the triangle inequality (adds, and every one-input op), ``l2`` the rule for
    concatenations, whose parts are disjoint: sqrt(sum_i (f_i L_i)^2).
    """

    factors: tuple[float, ...]
    method: str
    combine: str = "sum"
    linear: bool = False  # affine in its input-dependent inputs (a linear region may span it)

    @staticmethod
    def scale(factor: float, method: str, linear: bool = False) -> "Step":
        """A one-input op with Lipschitz constant ``factor``."""
        return Step((float(factor),), method, linear=linear)

    @staticmethod
    def affine(factor: float, method: str) -> "Step":
        """A one-input affine op with operator norm ``factor``."""
        return Step((float(factor),), method, linear=True)

    @property
    def local(self) -> float:
        """The op's own constant: the largest factor (its only one for one-input ops)."""
        return max(self.factors, default=0.0)


@dataclass
class NodeContext:
    """What a rule may look at: the node, its module, shapes and the values of constant args."""

    node: fx.Node
    module: Optional[nn.Module]
    module_name: Optional[str]
    inputs: list[fx.Node]  # input-dependent tensor inputs, in argument order (repeats kept)
    shapes: dict[fx.Node, Any]  # node -> torch.Size (tensors) or nested tuples of them
    constants: dict[fx.Node, Any]  # node -> value, for nodes that do not depend on the input
    method: str = "auto"  # the layer-bound method (lipfx.layer_bound)
    dtypes: dict[fx.Node, torch.dtype] = field(default_factory=dict)  # of the nodes whose value is one tensor
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.module_name is not None:
            return f"node '{self.node.name}' (module '{self.module_name}', {type(self.module).__name__})"
        inside = innermost_module(self.node)
        where = f" in module '{inside}'" if inside else ""
        return f"node '{self.node.name}' ({self.op_name}{where})"

    @property
    def op_name(self) -> str:
        return op_name(self.node, self.module)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument, with constant nodes replaced by their values."""
        args, kwargs = self.node.args, self.node.kwargs
        if index < len(args):
            value = args[index]
        elif name in kwargs:
            value = kwargs[name]
        else:
            return default
        return self.value(value)

    def value(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in self.constants:
                return self.constants[a]
            return a  # input-dependent: rules compare against self.inputs
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        return a

    def depends(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a not in self.constants

    def shape(self, a: Any = None) -> torch.Size:
        """Shape of an input node (default: the first input-dependent one)."""
        node = self.inputs[0] if a is None else a
        s = self.shapes.get(node)
        if not isinstance(s, torch.Size):
            raise Unbounded(f"{self.label}: no tensor shape recorded for input '{getattr(node, 'name', node)}'")
        return s

    @property
    def out_shape(self) -> torch.Size:
        s = self.shapes.get(self.node)
        if not isinstance(s, torch.Size):
            raise Unbounded(f"{self.label}: output is not a single tensor")
        return s


Rule = Callable[[NodeContext], Step]


def constant(value: float, method: str, linear: bool = False) -> Rule:
    """A rule for a one-input op whose constant does not depend on the call."""
    return lambda ctx: Step((float(value),), method, linear=linear)


def unbounded(reason: str) -> Rule:
    """A rule for an op with no global Lipschitz constant."""

    def rule(ctx: NodeContext) -> Step:
        raise Unbounded(f"{ctx.label}: {reason}")

    return rule


def max_abs(t: torch.Tensor) -> float:
    """max |t| rounded up by the certificate's relative slack (0 for an empty tensor)."""
    return float(t.detach().abs().max()) * (1 + RELATIVE_SLACK) if t.numel() else 0.0


def as_tuple(value: Any, d: int) -> tuple:
    """An int-or-sequence argument (kernel size, stride, ...) as a d-tuple."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * d


def op_name(node: fx.Node, module: Optional[nn.Module]) -> str:
    if node.op == "call_module":
        return type(module).__name__
    if node.op == "call_function":
        t = node.target
        mod = getattr(t, "__module__", None) or ""
        short = {"_operator": "operator", "torch._C._nn": "F", "torch.nn.functional": "F",
                 "torch._C._VariableFunctions": "torch"}.get(mod, mod)
        name = getattr(t, "__name__", repr(t))
        return f"{short}.{name}" if short else name
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return node.op


def numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def broadcast_factor(in_shape: Sequence[int], out_shape: Sequence[int]) -> float:
    """||broadcast|| = sqrt(copies of each element) = sqrt(numel(out) / numel(in))."""
    return math.sqrt(numel(out_shape) / max(numel(in_shape), 1))


Number = Union[int, float]
