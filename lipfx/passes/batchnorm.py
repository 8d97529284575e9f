"""BatchNorm passes (docs/math.md, section 6): fold into the preceding conv/linear, or remove.

Eval semantics: the running statistics are used, whatever mode the model is in. A BatchNorm
without running statistics normalises with batch statistics, which is not a fixed Lipschitz
map, so folding refuses it (use bn='remove').
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import LipfxError
from ..layers import ChannelAffine
from .graph_utils import call_count, module_of, replace_submodule
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


def _foldable(gm: fx.GraphModule, node: fx.Node, channels: int) -> bool:
    """Whether the BatchNorm at ``node`` can be folded into its producer: a conv/linear called once,
    whose only user is this BatchNorm, itself called once, and whose output-channel axis is the
    axis the BatchNorm normalizes (dim 1). A Linear's output features are the last dim, which is
    dim 1 only for 2-D inputs: that needs the shapes ``tensor_meta`` records."""
    prev = node.args[0] if node.args else None
    prev_module = module_of(gm, prev) if isinstance(prev, fx.Node) else None
    if not (isinstance(prev_module, FOLDABLE) and len(prev.users) == 1 and call_count(gm, prev.target) == 1
            and call_count(gm, node.target) == 1 and prev_module.weight.shape[0] == channels):
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
