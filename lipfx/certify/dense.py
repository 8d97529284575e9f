"""Exact norms of small linear regions of the graph.

Two zero-padded convs in a row are not one conv (the first one's output is cut off before the
second pads it), so a chain of spatial convs can only be bounded by the product of their norms,
often 1.5-2.5x its true norm. When a linear region (convs, pooling, adds, concatenations,
reshapes... between one source node and one end node) is small, its exact matrix is cheap: the
Jacobian of the region, evaluated in float64, whose certified spectral norm bounds it exactly.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from ..norms.conv import matrix_norm
from ..ops.context import Step, numel

DENSE_MAX = 2**22  # largest (output numel x input numel) handled densely: 2048 x 2048


def linear_region(
    end: fx.Node, steps: dict[fx.Node, Step], dependent: set[fx.Node], index: dict[fx.Node, int]
) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """(source, region nodes in graph order) of the largest linear region ending at ``end`` whose
    only input-dependent input is one ``source`` node; None if there is no such region of 2+ ops."""
    region, sources = {end}, set()
    pending = {a for a in end.all_input_nodes if a in dependent}
    while pending:
        u = max(pending, key=index.__getitem__)  # users before their inputs: membership is final
        pending.discard(u)
        if u in region or u in sources:
            continue
        step = steps.get(u)
        users = [w for w in u.users if w in dependent]
        if step is not None and step.linear and all(w in region for w in users):
            region.add(u)
            pending.update(a for a in u.all_input_nodes if a in dependent)
        else:
            sources.add(u)
    if len(sources) != 1 or len(region) < 2:
        return None
    return next(iter(sources)), sorted(region, key=index.__getitem__)


def _float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double()
    if isinstance(value, (list, tuple)):
        return type(value)(_float64(v) for v in value)
    return value


def region_norm(
    gm: fx.GraphModule, source: fx.Node, nodes: list[fx.Node], constants: dict[fx.Node, Any], source_shape: torch.Size
) -> float:
    """Certified norm of the (affine) map source -> nodes[-1], from its dense float64 Jacobian."""
    modules: dict[str, nn.Module] = {}

    def module(name: str) -> nn.Module:
        if name not in modules:
            modules[name] = copy.deepcopy(gm.get_submodule(name)).double().eval()
        return modules[name]

    def run(x: torch.Tensor) -> torch.Tensor:
        env: dict[fx.Node, Any] = {source: x}
        for n in nodes:
            args, kwargs = fx.node.map_arg(
                (n.args, n.kwargs), lambda a: env[a] if a in env else _float64(constants[a])
            )
            if n.op == "call_module":
                env[n] = module(n.target)(*args, **kwargs)
            elif n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            else:
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        return env[nodes[-1]]

    x0 = torch.zeros(source_shape, dtype=torch.float64)
    out_numel = numel(run(x0).shape)
    if numel(source_shape) < out_numel:
        with warnings.catch_warnings():
            # torch's first forward-mode call scripts its jvp decompositions, which warns that
            # torch.jit.script is deprecated: torch-internal noise, not the user's concern
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            jac = torch.func.jacfwd(run)(x0)
    else:
        jac = torch.func.jacrev(run)(x0)
    return matrix_norm(jac.reshape(out_numel, numel(source_shape)))
