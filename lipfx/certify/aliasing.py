"""In-place ops whose mutation other nodes would see (docs/math.md, section 8).

The walk gives every node the bound of the value the node computes; an in-place op changes the
value of its input tensor *and of everything aliasing it* (views, the input itself) for every
later reader. A mutation is sound to walk over only when no node reads the mutated tensor, or a
view of it, after the mutation: then the in-place op is just its out-of-place twin. Otherwise
lipfx refuses the node (an infinite bound, with the readers named) rather than certify a value
the network never computes.
"""

from __future__ import annotations

import inspect
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.setitem}  # x[i] = y writes into x
_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                    "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
# ops whose result may share memory with their first argument
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
                 "swapaxes", "swapdims", "t", "squeeze", "unsqueeze", "narrow", "movedim", "moveaxis", "chunk",
                 "split", "unbind", "expand", "expand_as", "detach", "contiguous", "as_strided", "diagonal",
                 "select", "unfold", "to", "type_as", "float", "double", "view_as_real", "real"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose,
                   torch.swapaxes, torch.squeeze, torch.unsqueeze, torch.narrow, torch.movedim, torch.chunk,
                   torch.split, torch.unbind, torch.t, torch.detach, torch.unflatten, torch.select,
                   torch.diagonal, torch.as_strided}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)  # may return their input


def mutated_input(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[fx.Node]:
    """The node whose tensor ``node`` writes to in place, or None."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_method":
        name = str(node.target)
        writes = (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS
        return first if writes else None
    if node.op == "call_module":
        return first if getattr(modules.get(node.target), "inplace", False) is True else None
    if node.op != "call_function":
        return None
    target = node.target
    if target in _INPLACE_OPERATORS:
        return first
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("__"):  # torch.relu_, F.leaky_relu_, ...
        return first
    return first if _inplace_argument(target, node) else None


def _inplace_argument(target, node: fx.Node) -> bool:
    """``inplace=True`` given by keyword or position (F.relu(x, True), F.dropout(..., inplace=True))."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or a call it cannot bind
        return False
    return bound.arguments.get("inplace") is True


def _aliases_input(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _VIEW_MODULES)
    return False


def _views_of(node: fx.Node, modules: dict[str, nn.Module], writer: fx.Node) -> set[fx.Node]:
    """``node``'s storage root, and every node that may share memory with it, except what is
    derived from ``writer`` (whose value the walk models as the mutated one)."""
    root = node
    while root.args and isinstance(root.args[0], fx.Node) and (
            _aliases_input(root, modules) or mutated_input(root, modules) is not None):
        root = root.args[0]
    group, todo = {root}, [root]
    while todo:
        for user in todo.pop().users:
            if user is not writer and user not in group and user.args and user.args[0] in group and (
                    _aliases_input(user, modules) or mutated_input(user, modules) is not None):
                group.add(user)
                todo.append(user)
    return group


def mutation_reasons(graph: fx.Graph, modules: dict[str, nn.Module], dependent: set[fx.Node]) -> dict[fx.Node, str]:
    """The nodes that read a tensor (directly or through a view) after an in-place op wrote to
    it: the walk would give them the value before the write. Each maps to the reason."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    reasons: dict[fx.Node, str] = {}
    for n in graph.nodes:
        target = mutated_input(n, modules)
        if target is None or target not in dependent:
            continue
        group = _views_of(target, modules, n)
        late = {u for g in group for u in g.users if u is not n and u not in group and order[u] > order[n]}
        late |= {g for g in group if order[g] > order[n]}  # a view taken after the write
        for u in late:
            reasons.setdefault(u, f"reads '{target.name}' after '{n.name}' wrote to it in place (aliasing): "
                                  "write that op out of place (inplace=False, x = x + y) to certify it")
    return reasons
