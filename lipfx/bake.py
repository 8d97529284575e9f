"""``lipfx.bake``: a plain copy of a converted model that runs without lipfx.

Every normalized weight is replaced by its eval-mode value (certified bound, so each layer's
norm is <= K); every lipfx module becomes ordinary torch: the :class:`SeparableConv` containers
become plain ``nn.Module`` holders of their two convs, and :class:`ChannelAffine` nodes become
``x * scale + shift`` in the graph. The result pickles, loads without lipfx, and exports with
``torch.export``.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from .errors import LipfxError
from .layers import ChannelAffine, SeparableConv
from .normalization import disable_batching
from .normalization.base import check_input_size
from .passes.graph_utils import replace_submodule

LIPFX_ATTRS = ("lipfx_report", "lipfx_certificate")


@torch.no_grad()
def bake(net: nn.Module) -> nn.Module:
    """Return a copy of ``net`` with normalizations applied and lipfx modules made plain.

    ``net`` is left unchanged. The copy is in eval mode and gives the same outputs as ``net``
    in eval mode. Works on any module; graph rewrites (ChannelAffine) need a GraphModule.
    """
    out = copy.deepcopy(net).eval()
    for module in list(out.modules()):
        if parametrize.is_parametrized(module):
            _unparametrize(module)
    for attr in LIPFX_ATTRS:
        if hasattr(out, attr):
            delattr(out, attr)
    for module in out.modules():  # normalize(batched=True)'s hooks would make loading need lipfx
        disable_batching(module)
    if isinstance(out, fx.GraphModule):
        _inline_channel_affine(out)
        # the tracer class is pickled with a GraphModule; lipfx's would make loading need lipfx
        out._tracer_cls = out.graph._tracer_cls = None
    for name, module in list(out.named_modules()):
        if isinstance(module, SeparableConv):
            holder = nn.Module()
            holder.depthwise, holder.pointwise = module.depthwise, module.pointwise
            replace_submodule(out, name, holder)
    leftover = [n for n, m in out.named_modules() if type(m).__module__.startswith("lipfx")]
    if leftover:
        raise LipfxError(f"cannot bake lipfx modules outside a torch.fx graph: {leftover}")
    return out


def _unparametrize(module: nn.Module) -> None:
    """Freeze each parametrized tensor to its current (eval) value as a plain Parameter."""
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations.keys()}
    strip_parametrizations(module, {name: nn.Parameter(value) for name, value in values.items()})


def strip_parametrizations(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make ``module`` unparametrized again, registering ``tensors[attr]`` for each attribute
    (``nn.Parameter`` as a parameter, any other tensor as a buffer).

    Not ``parametrize.remove_parametrizations``: a deepcopy shares its injected class with the
    original, and removing deletes the property from that shared class, breaking the original.
    Changing this instance's class back to the base class touches nothing shared.
    """
    module.__class__ = type(module).__bases__[0]
    del module._modules["parametrizations"]
    for key in [k for k, fn in module._forward_pre_hooks.items() if fn is check_input_size]:
        del module._forward_pre_hooks[key]  # it reads the parametrizations (and would make loading need lipfx)
    for name, value in tensors.items():
        if isinstance(value, nn.Parameter):
            module.register_parameter(name, value)
        else:
            module.register_buffer(name, value)


def _inline_channel_affine(gm: fx.GraphModule) -> None:
    """call_module(ChannelAffine) -> x * scale.reshape(1, -1, 1, ...) + shift.reshape(...)."""
    affines = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ChannelAffine):
            continue
        meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
        if meta is None:
            raise LipfxError(f"ChannelAffine '{node.target}': input rank unknown (no tensor_meta); run convert with example_inputs")
        shape = (1, -1) + (1,) * (len(meta.shape) - 2)
        with gm.graph.inserting_before(node):
            scale = gm.graph.get_attr(f"{node.target}.scale")
            shift = gm.graph.get_attr(f"{node.target}.shift")
            scaled = gm.graph.call_function(torch.mul, (node.args[0], gm.graph.call_method("reshape", (scale, shape))))
            new = gm.graph.call_function(torch.add, (scaled, gm.graph.call_method("reshape", (shift, shape))))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        affines[node.target] = gm.get_submodule(node.target)
    for name, affine in affines.items():
        holder = nn.Module()
        holder.scale, holder.shift = affine.scale, affine.shift
        replace_submodule(gm, name, holder)
    gm.graph.lint()
    gm.recompile()
