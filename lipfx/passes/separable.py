"""Rewrite convolutions as depthwise-separable pairs (docs/math.md, section 4).

For each input channel c, the Cout x k^d slice M_c = U S V^T of the kernel gives
    y = sum_c U_c S_c^(1/2) ( (S_c^(1/2) V_c^T) * x_c ),
a depthwise conv with channel multiplier r followed by a 1x1 conv: exact at r = min(Cout_g, k^d),
the classic low-rank factorisation below it. Grouped convs are factorised per group and the
pointwise part keeps ``groups``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from ..errors import ArgumentError
from ..layers import SeparableConv
from ..norms.geometry import conv_geometry
from .graph_utils import module_of, replace_submodule
from .report import ConversionReport

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODES = ("exact", "lowrank", "fresh")


def _make_pair(conv: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    d = conv.weight.dim() - 2
    cls = _CONV[d]
    kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    depthwise = cls(conv.in_channels, conv.in_channels * rank, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.in_channels, bias=False,
                    padding_mode=conv.padding_mode, **kw)
    pointwise = cls(conv.in_channels * rank, conv.out_channels, 1, groups=conv.groups,
                    bias=conv.bias is not None, **kw)
    return depthwise, pointwise


def full_rank(conv: nn.Module) -> int:
    """Channel multiplier of the exact rewrite: min(Cout / groups, k^d)."""
    return min(conv.out_channels // conv.groups, math.prod(conv.kernel_size))


@torch.no_grad()
def factorize_conv(conv: nn.Module, mode: str = "exact", rank: Optional[int] = None) -> tuple[SeparableConv, Optional[float]]:
    """Depthwise-separable replacement of ``conv`` and its relative kernel error (None for fresh).

    mode: 'exact' (full rank, outputs equal up to rounding), 'lowrank' (``rank`` singular values
    per input channel), 'fresh' (newly initialised pair, multiplier ``rank`` or 1).
    """
    if mode not in MODES:
        raise ArgumentError(f"unknown separable mode {mode!r}; choose from {MODES} or None")
    g = conv.groups
    cout, cin_g = conv.weight.shape[:2]
    taps = math.prod(conv.kernel_size)
    full = full_rank(conv)
    if mode == "fresh":
        r = rank or 1
        depthwise, pointwise = _make_pair(conv, r)
        return SeparableConv(depthwise, pointwise, r), None
    if mode == "lowrank" and (rank is None or rank < 1):
        raise ArgumentError("separable='lowrank' needs rank >= 1")
    r = full if mode == "exact" else min(rank, full)
    w = conv.weight.detach().double().reshape(g, cout // g, cin_g, taps).permute(0, 2, 1, 3)  # (g, ci, co, K)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # s: (g, ci, full)
    root = s[..., :r].sqrt()
    dw = (root.unsqueeze(-1) * vh[..., :r, :]).reshape(g * cin_g * r, 1, *conv.kernel_size)
    pw = (u[..., :r] * root.unsqueeze(-2)).permute(0, 2, 1, 3).reshape(cout, cin_g * r, *([1] * len(conv.kernel_size)))
    depthwise, pointwise = _make_pair(conv, r)
    depthwise.weight.copy_(dw.to(conv.weight.dtype))
    pointwise.weight.copy_(pw.to(conv.weight.dtype))
    if conv.bias is not None:
        pointwise.bias.copy_(conv.bias)
    dropped = s[..., r:].square().sum()
    error = float(torch.sqrt(dropped / s.square().sum().clamp_min(1e-300)))
    return SeparableConv(depthwise, pointwise, r), error


def rewrite_separable(
    gm: fx.GraphModule,
    mode: str = "exact",
    rank: Optional[int] = None,
    report: ConversionReport | None = None,
) -> fx.GraphModule:
    """Replace every conv that is neither depthwise nor pointwise by ``target.depthwise`` then
    ``target.pointwise`` graph nodes (a :class:`SeparableConv` at the old name). In place."""
    report = report if report is not None else ConversionReport()
    done: dict[str, SeparableConv] = {}
    for node in list(gm.graph.nodes):
        target = node.target
        conv = module_of(gm, node)
        if target not in done:
            if not isinstance(conv, tuple(_CONV.values())):
                continue
            geom = conv_geometry(conv, target)
            if geom.is_depthwise or geom.is_pointwise:
                continue
            sep, error = factorize_conv(conv, mode, rank)
            replace_submodule(gm, target, sep)
            done[target] = sep
            report.add(target, f"separable-{mode}", f"rank {sep.rank} of {full_rank(conv)}", error)
        with gm.graph.inserting_before(node):
            dw = gm.graph.call_module(f"{target}.depthwise", node.args, node.kwargs)
            pw = gm.graph.call_module(f"{target}.pointwise", (dw,))
        pw.meta = dict(node.meta)
        node.replace_all_uses_with(pw)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm
