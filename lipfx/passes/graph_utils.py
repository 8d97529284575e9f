"""Helpers shared by the passes: module lookup and replacement by dotted name."""

from __future__ import annotations

import builtins

import torch.fx as fx
from torch import nn


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def replace_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted name ``target`` of ``root`` (any module, GraphModules too)."""
    parent_name, _, child = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def call_count(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def fetch_attr(root: nn.Module, target: str) -> object:
    """The tensor or module at the dotted name of a get_attr node."""
    obj: object = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}


def is_shape_query(node: fx.Node) -> bool:
    """A node that reads only a tensor's shape, dtype or device, never its values."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return node.args[1] in _SHAPE_ATTRS
        return node.target is builtins.len
    return False


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (shape queries and asserts on them do not)."""
    return [u for u in node.users if not is_shape_query(u)]


def innermost_module(node: fx.Node) -> str | None:
    """The qualified name of the innermost module whose forward made this call (fx records the
    module stack), or None at the top level."""
    stack = node.meta.get("nn_module_stack") or {}
    inner = next(reversed(stack.values()), None) if stack else None
    return inner[0] if isinstance(inner, tuple) and inner[0] else None


def replace_with_module(gm: fx.GraphModule, node: fx.Node, base: str, module: nn.Module, source: fx.Node) -> fx.Node:
    """Put a call of ``module`` (added to ``gm`` under a free name from ``base``) on ``source`` in
    place of ``node``: its users read the new node, which keeps ``node``'s meta (same shape)."""
    name = free_name(gm, base)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (source,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def free_name(gm: fx.GraphModule, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first name no attribute of ``gm`` has."""
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name
