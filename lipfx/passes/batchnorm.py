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


def fold_batchnorm(gm: fx.GraphModule, report: ConversionReport | None = None) -> fx.GraphModule:
    """Fold every BatchNorm that directly follows a conv/linear (used nowhere else) into it;
    turn every other BatchNorm into a :class:`~lipfx.layers.ChannelAffine`. In place; returns gm."""
    report = report if report is not None else ConversionReport()
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, _BatchNorm):
            continue
        label = f"node '{node.name}' (module '{node.target}')"
        a, b = bn_affine(bn, label)
        prev = node.args[0]
        prev_module = module_of(gm, prev) if isinstance(prev, fx.Node) else None
        if (
            isinstance(prev_module, FOLDABLE)
            and len(prev.users) == 1
            and call_count(gm, prev.target) == 1  # a shared layer would change its other uses
            and prev_module.weight.shape[0] == a.numel()
        ):
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
