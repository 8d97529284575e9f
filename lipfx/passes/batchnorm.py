"""BatchNorm passes (docs/math.md, section 6): fold into the preceding conv/linear, or remove.

Eval semantics: the running statistics are used, whatever mode the model is in. A BatchNorm
without running statistics normalises with batch statistics, which is not a fixed Lipschitz
map, so folding refuses it (use bn='remove').
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import LipfxError
from ..layers import ChannelAffine
from .graph_utils import call_count, fetch_attr, innermost_module, module_of, replace_submodule, value_users
from .report import ConversionReport

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def bn_affine(bn: _BatchNorm, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with bn(x) = a * x + b per channel in eval mode, computed in float64."""
    if bn.running_var is None or bn.running_mean is None:
        raise LipfxError(
            f"{label}: BatchNorm without running statistics normalises with batch statistics, "
            "which has no Lipschitz bound; convert with bn='remove'"
        )
    mean = bn.running_mean.detach().double()
    a = eval_scale(bn.running_var, bn.weight, bn.eps)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(a)
    return a, beta - a * mean


def eval_scale(running_var: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """a = gamma / sqrt(var + eps) in float64: eval BatchNorm's per-channel slope."""
    var = running_var.detach().double()
    gamma = weight.detach().double() if weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + eps)


@torch.no_grad()
def _fold_into(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    w = layer.weight
    w64 = w.double() * a.reshape(-1, *([1] * (w.dim() - 1)))
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(a)
    w.copy_(w64.to(w.dtype))
    new_bias = (a * bias + b).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def _functional_affine(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) of an ``F.batch_norm`` call whose statistics and affine parameters are module
    tensors (get_attr nodes), as timm's fused BatchNorm + activation modules make; else None."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)

    def tensor(key: str):
        a = args.get(key)
        if a is None:
            return None
        if not (isinstance(a, fx.Node) and a.op == "get_attr"):
            raise TypeError  # an input-dependent or computed argument: leave the call alone
        return fetch_attr(gm, a.target)

    try:
        mean, var, weight, bias = (tensor(k) for k in ("running_mean", "running_var", "weight", "bias"))
    except TypeError:
        return None
    if mean is None or var is None:
        return None
    a = eval_scale(var, weight, float(args.get("eps", 1e-5)))
    beta = bias.detach().double() if bias is not None else torch.zeros_like(a)
    return a, beta - a * mean.detach().double()


def _foldable(gm: fx.GraphModule, node: fx.Node, channels: int) -> bool:
    """Whether the BatchNorm at ``node`` can be folded into its producer: a conv/linear called once,
    whose only user is this BatchNorm, itself called once, and whose output-channel axis is the
    axis the BatchNorm normalizes (dim 1). A Linear's output features are the last dim, which is
    dim 1 only for 2-D inputs: that needs the shapes ``tensor_meta`` records."""
    prev = node.args[0] if node.args else None
    prev_module = module_of(gm, prev) if isinstance(prev, fx.Node) else None
    once = node.op != "call_module" or call_count(gm, node.target) == 1
    if not (isinstance(prev_module, FOLDABLE) and len(value_users(prev)) == 1 and call_count(gm, prev.target) == 1
            and once and prev_module.weight.shape[0] == channels):
        return False
    if isinstance(prev_module, nn.Linear):
        meta = prev.meta.get("tensor_meta")
        return meta is not None and len(meta.shape) == 2
    return True


def fold_batchnorm(gm: fx.GraphModule, report: ConversionReport | None = None) -> fx.GraphModule:
    """Fold every BatchNorm into the conv/linear before it where that is exact (see
    :func:`_foldable`); turn every other BatchNorm into a :class:`~lipfx.layers.ChannelAffine`
    (one per module, shared by all its calls). In place; returns gm."""
    report = report if report is not None else ConversionReport()
    for node in list(gm.graph.nodes):
        functional = _functional_affine(gm, node)
        if functional is not None:
            _fold_functional(gm, node, *functional, report)
            continue
        bn = module_of(gm, node)
        if not isinstance(bn, _BatchNorm):
            continue
        label = f"node '{node.name}' (module '{node.target}')"
        a, b = bn_affine(bn, label)
        if _foldable(gm, node, a.numel()):
            prev = node.args[0]
            prev_module = module_of(gm, prev)
            _fold_into(prev_module, a, b)
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            replace_submodule(gm, node.target, nn.Identity())  # keep the name, drop the state
            report.add(prev.target, "bn-folded", f"folded {node.target}")
        else:
            replace_submodule(gm, node.target, ChannelAffine(a.to(bn.running_var.dtype), b.to(bn.running_var.dtype)))
            report.add(node.target, "bn-affine", f"max |scale| = {float(a.abs().max()):.4g}")
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fold_functional(gm: fx.GraphModule, node: fx.Node, a: torch.Tensor, b: torch.Tensor,
                     report: ConversionReport) -> None:
    """Fold an ``F.batch_norm`` call with module statistics into the layer before it, or replace
    it with a new ChannelAffine module (named after the module that made the call)."""
    dtype = node.args[0].meta["tensor_meta"].dtype if "tensor_meta" in node.args[0].meta else torch.float32
    owner = innermost_module(node) or node.name
    if _foldable(gm, node, a.numel()):
        prev = node.args[0]
        _fold_into(module_of(gm, prev), a, b)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        report.add(prev.target, "bn-folded", f"folded batch_norm of {owner}")
        return
    name = f"{owner}_affine".replace(".", "_")
    gm.add_submodule(name, ChannelAffine(a.to(dtype), b.to(dtype)))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[0],))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    report.add(name, "bn-affine", f"batch_norm of {owner}: max |scale| = {float(a.abs().max()):.4g}")


def remove_batchnorm(gm: fx.GraphModule, report: ConversionReport | None = None) -> fx.GraphModule:
    """Drop every BatchNorm (the setting for training from scratch, as in the papers)."""
    report = report if report is not None else ConversionReport()
    for node in list(gm.graph.nodes):
        if isinstance(module_of(gm, node), _BatchNorm):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            report.add(node.target, "bn-removed")
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
