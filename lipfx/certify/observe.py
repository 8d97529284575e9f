"""What the certificate observes before any rule runs: which nodes depend on the network input,
every node's shape, and the values of the nodes that do not depend on the input."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from ..passes.graph_utils import is_shape_query

def dependent_nodes(graph: fx.Graph) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or (
            n.op != "get_attr" and not is_shape_query(n) and any(a in dep for a in n.all_input_nodes)
        ):
            dep.add(n)
    return dep


def shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (list, tuple)):
        return tuple(shape_of(v) for v in value)
    return None


class Observer(fx.Interpreter):
    """Runs the graph once: every node's shape, and the values of input-independent nodes."""

    def __init__(self, gm: fx.GraphModule, dependent: set[fx.Node]) -> None:
        super().__init__(gm)
        self.dependent = dependent
        self.shapes: dict[fx.Node, Any] = {}
        self.dtypes: dict[fx.Node, torch.dtype] = {}  # nodes whose value is one tensor
        self.constants: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = shape_of(result)
        if isinstance(result, torch.Tensor):
            self.dtypes[n] = result.dtype
        if n not in self.dependent:
            self.constants[n] = result
        return result


def flat_inputs(node: fx.Node, dependent: set[fx.Node]) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a))
    return [a for a in found if a in dependent]


def non_real_reason(dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why a node whose values have ``dtype`` has no Lipschitz constant (None for real floats).

    The certificate bounds the real-valued function the graph computes: a cast between floating
    types is the identity on values, but integer and bool values (casts, comparisons, argmax)
    jump, and complex values are outside the model.
    """
    if dtype is None or dtype.is_floating_point:
        return None
    if dtype.is_complex:
        return f"its values are complex ({dtype}): lipfx certifies real-valued functions"
    return f"its values are {dtype} (a cast, comparison or index): not a continuous function of the input"
