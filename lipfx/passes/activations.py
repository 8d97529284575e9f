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
from .graph_utils import replace_with_module
from .report import ConversionReport

RELU_LIKE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
                     nn.Mish, nn.Hardswish)
RELU_LIKE_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu,
                       F.elu_, F.celu, F.selu, torch.selu, F.gelu, F.silu, F.mish, F.hardswish)
RELU_LIKE_METHODS = ("relu", "relu_")
_IN_PLACE = {F.relu_, torch.relu_, F.leaky_relu_, F.elu_, "relu_"}


def replace_activations(gm: fx.GraphModule, activation: str, report: Optional[ConversionReport] = None) -> int:
    """Put a new ``activation`` module (a key of :data:`lipfx.activations.GNP_ACTIVATIONS`) in
    place of every ReLU-like activation of ``gm``, in place; returns how many were replaced.
    Needs ``node.meta['tensor_meta']`` (``lipfx.convert`` records it): ``"householder"`` gets
    one angle per pair of channels (dim 1)."""
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
        module = make(_channels(node, label))
        replace_with_module(gm, node, f"gnp_{node.name}", module, source)
        if report is not None:
            report.add(label, f"activation-{activation}", f"{label} -> {module!r}")
        count += 1
    gm.delete_all_unused_submodules()  # the replaced activation modules
    gm.graph.lint()
    gm.recompile()
    return count


def _channels(node: fx.Node, label: str) -> int:
    """The node's size along dim 1 (a learnable activation has one parameter per channel pair)."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 2:
        raise LipfxError(f"'{label}': no recorded shape with a channel dim (run lipfx.tracing.propagate_shapes first)")
    return int(shape[1])


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
