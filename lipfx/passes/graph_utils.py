"""Helpers shared by the passes: module lookup and replacement by dotted name."""

from __future__ import annotations

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
