"""Entries for layers that normalise by statistics of their own input: LayerNorm, GroupNorm,
InstanceNorm (without running statistics), RMSNorm and ``F.normalize`` (docs/math.md, section 12).

With eps > 0 they are globally Lipschitz. For z = (x - mean) / sqrt(var + eps) over a group of n
values, the Jacobian is (I - 11^T / n - z z^T / n) / sqrt(var + eps): a contraction divided by
sqrt(var + eps), so its norm is at most 1 / sqrt(eps), attained at constant inputs (var = 0). The
affine weight multiplies by at most max|gamma|. RMSNorm, x / sqrt(mean(x^2) + eps), has Jacobian
(I - x x^T / (n r^2)) / r with r >= sqrt(eps): the same 1 / sqrt(eps). ``F.normalize`` (p = 2),
x / max(||x||, eps), has Jacobian norm at most 1 / eps. Eval-mode BatchNorm is a fixed affine map
and lives with the weighted layers (:mod:`lipfx.ops.layers`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from ..certify.linear_chains import LinearMap, diagonal
from ..passes.batchnorm import eval_scale
from .context import NodeContext, Step, Unbounded, max_abs, unbounded
from .fuzzing import FuzzCase, apply, randn
from .layers import STATISTICS_REASON
from .table import OpEntry, table

_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
_RMS_FN = (F.rms_norm,) if hasattr(F, "rms_norm") else ()


def statistics_constant(ctx: NodeContext, weight: Optional[torch.Tensor], eps: Optional[float]) -> Step:
    """max|gamma| / sqrt(eps): the constant of a normalisation by the input's own statistics."""
    if eps is None:  # RMSNorm's default: the input dtype's machine epsilon
        eps = torch.finfo(ctx.dtypes.get(ctx.inputs[0], torch.get_default_dtype())).eps
    if not eps > 0:
        raise Unbounded(f"{ctx.label}: eps={eps}: {STATISTICS_REASON}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise Unbounded(f"{ctx.label}: an input-dependent affine weight")
    gamma = max_abs(weight.double()) if weight is not None else 1.0
    return Step.scale(gamma / math.sqrt(eps) * (1 + 1e-12), "normalised by own statistics: max|gamma| / sqrt(eps)")


def _layer_norm_rule(ctx: NodeContext) -> Step:
    m = ctx.module
    if m is not None:
        return statistics_constant(ctx, getattr(m, "weight", None), m.eps)
    if ctx.node.target in _RMS_FN:  # F.rms_norm(input, normalized_shape, weight=None, eps=None)
        return statistics_constant(ctx, ctx.arg(2, "weight"), ctx.arg(3, "eps"))
    if ctx.node.target is F.group_norm:  # (input, num_groups, weight, bias, eps)
        return statistics_constant(ctx, ctx.arg(2, "weight"), ctx.arg(4, "eps", 1e-5))
    return statistics_constant(ctx, ctx.arg(2, "weight"), ctx.arg(4, "eps", 1e-5))  # layer_norm


def _layer_norm_cases(key, g: torch.Generator) -> list[FuzzCase]:
    x = randn((2, 4, 6), g)
    if key is nn.LayerNorm:
        m = nn.LayerNorm(6, eps=1e-2)
        return [FuzzCase(_random_affine(m, g), (x,), "LayerNorm(6)"), FuzzCase(nn.LayerNorm(6), (x * 1e-3,), "tiny")]
    if key is nn.GroupNorm:
        return [FuzzCase(_random_affine(nn.GroupNorm(2, 4, eps=1e-2), g), (x,), "GroupNorm(2, 4)")]
    if key in _RMS:
        return [FuzzCase(_random_affine(key(6, eps=1e-2), g), (x,), "RMSNorm(6)")]
    w = randn((6,), g, 2.0)
    if key is F.layer_norm:
        return [FuzzCase(lambda t: F.layer_norm(t, (6,), w, None, 1e-2), (x,), "F.layer_norm")]
    if key is F.group_norm:
        return [FuzzCase(lambda t: F.group_norm(t, 2, w[:4], None, 1e-2), (x,), "F.group_norm")]
    return [FuzzCase(lambda t: key(t, (6,), w, 1e-2), (x,), "F.rms_norm")]


def _random_affine(m: nn.Module, g: torch.Generator) -> nn.Module:
    if getattr(m, "weight", None) is not None:
        with torch.no_grad():
            m.weight.copy_(randn(m.weight.shape, g, 2.0))
    return m


def _uses_running_stats(m: nn.Module) -> bool:
    # torch's InstanceNorm normalizes by the input's statistics when training or not tracking
    return not m.training and m.track_running_stats and m.running_var is not None


def _instance_norm_rule(ctx: NodeContext) -> Step:
    m = ctx.module
    if m is not None:
        if _uses_running_stats(m):
            return Step.affine(max_abs(eval_scale(m.running_var, m.weight, m.eps)),
                               "instance norm with running statistics: max|gamma / sqrt(var + eps)|")
        return statistics_constant(ctx, m.weight, m.eps)
    # F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if not ctx.arg(5, "use_input_stats", True) and isinstance(ctx.arg(2, "running_var"), torch.Tensor):
        return Step.affine(max_abs(eval_scale(ctx.arg(2, "running_var"), ctx.arg(3, "weight"), ctx.arg(7, "eps", 1e-5))),
                           "instance norm with running statistics: max|gamma / sqrt(var + eps)|")
    return statistics_constant(ctx, ctx.arg(3, "weight"), ctx.arg(7, "eps", 1e-5))


def _instance_norm_map(module: nn.Module, name: str, in_shape: torch.Size) -> Optional[LinearMap]:
    if not _uses_running_stats(module):
        return None
    return diagonal(eval_scale(module.running_var, module.weight, module.eps), len(in_shape) - 2, name)


def _instance_norm_cases(key, g: torch.Generator) -> list[FuzzCase]:
    if key is F.instance_norm:
        return [FuzzCase(apply(key, eps=1e-2), (randn((2, 3, 5), g),), "input statistics")]
    if key is _InstanceNorm:
        key = nn.InstanceNorm2d
    d = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[key]
    x = randn((2, 3) + (4,) * d, g)
    tracked = key(3, affine=True, track_running_stats=True)
    with torch.no_grad():
        tracked.running_var.copy_(randn((3,), g).abs() + 0.05)
    return [FuzzCase(_random_affine(key(3, eps=1e-2, affine=True), g), (x,), "input statistics"),
            FuzzCase(_random_affine(tracked, g).eval(), (x,), "running statistics")]


def _normalize_rule(ctx: NodeContext) -> Step:
    p, eps = ctx.arg(1, "p", 2.0), ctx.arg(3, "eps", 1e-12)
    if p != 2 or not eps > 0:
        raise Unbounded(f"{ctx.label}: F.normalize with p={p}, eps={eps} has no rule (p = 2 and eps > 0 do)")
    return Step.scale(1.0 / eps * (1 + 1e-12), "x / max(||x||, eps): 1 / eps")


ENTRIES = (
    OpEntry((nn.LayerNorm, nn.GroupNorm, F.layer_norm, F.group_norm) + _RMS + _RMS_FN, _layer_norm_rule,
            _layer_norm_cases, doc="max|gamma| / sqrt(eps)"),
    OpEntry((_InstanceNorm, F.instance_norm), _instance_norm_rule, _instance_norm_cases, linear_map=_instance_norm_map,
            doc="max|gamma| / sqrt(eps); with running statistics (eval) max|gamma / sqrt(var + eps)|"),
    OpEntry((F.normalize,), _normalize_rule,
            lambda key, g: [FuzzCase(apply(key, eps=0.5, dim=1), (randn((3, 4), g, 0.3),), "near 0")], doc="1 / eps"),
    OpEntry((nn.LocalResponseNorm, F.local_response_norm), unbounded(STATISTICS_REASON), lambda key, g: [],
            doc="unbounded"),
)
for _entry in ENTRIES:
    table().add(_entry)
