"""Replace ReLU-like activations by gradient-norm-preserving ones (``convert(..., activation=...)``).

Every elementwise ReLU-like activation (module or functional call) becomes a new instance of the
chosen GNP module (:mod:`lipfx.activations`) at the same place in the graph. An in-place
activation whose input another node also reads is refused: the out-of-place replacement would
change what that node sees.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..activations import GNP_ACTIVATIONS
from ..errors import ArgumentError, LipfxError
from .report import ConversionReport

RELU_LIKE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
                     nn.Mish, nn.Hardswish)
RELU_LIKE_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu,
                       F.elu_, F.celu, F.selu, torch.selu, F.gelu, F.silu, F.mish, F.hardswish)
RELU_LIKE_METHODS = ("relu", "relu_")
_IN_PLACE = {F.relu_, torch.relu_, F.leaky_relu_, F.elu_, "relu_"}


def replace_activations(gm: fx.GraphModule, activation: str, report: Optional[ConversionReport] = None) -> int:
    """Put a new ``activation`` module (a key of :data:`lipfx.activations.GNP_ACTIVATIONS`) in
    place of every ReLU-like activation of ``gm``, in place; returns how many were replaced."""
    if activation not in GNP_ACTIVATIONS:
        raise ArgumentError(f"unknown activation {activation!r}; choose from {tuple(GNP_ACTIVATIONS)} or None")
    make = GNP_ACTIVATIONS[activation]
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        label = _relu_like(node, modules)
        if label is None:
            continue
        source = node.args[0] if node.args else node.kwargs.get("input")
        if _in_place(node, modules) and isinstance(source, fx.Node) and len(source.users) > 1:
            raise LipfxError(f"activation={activation!r}: '{label}' works in place and its input '{source.name}' is "
                             "also read elsewhere; an out-of-place replacement would change that reader")
        name = _free_name(gm, f"gnp_{node.name}")
        gm.add_submodule(name, make())
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (source,))
        new.meta = dict(node.meta)  # same shape: the shapes convert recorded stay true
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if report is not None:
            report.add(label, f"activation-{activation}", f"{label} -> {make.__name__}")
        count += 1
    gm.delete_all_unused_submodules()  # the replaced activation modules
    gm.graph.lint()
    gm.recompile()
    return count


def _relu_like(node: fx.Node, modules: dict) -> Optional[str]:
    if node.op == "call_module" and isinstance(modules.get(node.target), RELU_LIKE_MODULES):
        return str(node.target)
    if node.op == "call_function" and node.target in RELU_LIKE_FUNCTIONS:
        return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
    if node.op == "call_method" and node.target in RELU_LIKE_METHODS:
        return f"{node.name} (.{node.target})"
    return None


def _in_place(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    return node.target in _IN_PLACE or bool(node.kwargs.get("inplace", False))


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name

