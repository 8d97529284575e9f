"""Exact norms of small linear regions of the graph.

Two zero-padded convs in a row are not one conv (the first one's output is cut off before the
second pads it), so a chain of spatial convs can only be bounded by the product of their norms,
often 1.5-2.5x its true norm. When a linear region (convs, pooling, adds, concatenations,
reshapes... between one source node and one end node) is small, its exact matrix is cheap. It is
built from *values*, not autograd: column i is f(e_i) - f(0), evaluated in float64, exact for an
affine map whatever autograd would say about it (a ``.detach()`` inside the region is the identity
on values, and a Jacobian would drop that path). Its certified spectral norm bounds the region.
"""

from __future__ import annotations

import copy
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
    """Certified norm of the (affine) map source -> nodes[-1], from its dense float64 matrix
    (built by forward evaluations of the basis vectors)."""
    modules: dict[str, nn.Module] = {}

    def module(name: str) -> nn.Module:
        if name not in modules:
            modules[name] = copy.deepcopy(gm.get_submodule(name)).double().eval()
        return modules[name]

    def run(x: torch.Tensor) -> torch.Tensor:
        env: dict[fx.Node, Any] = {source: x.clone()}  # in-place ops in the region must not touch the basis
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

    n_in = numel(source_shape)
    base = run(torch.zeros(source_shape, dtype=torch.float64)).reshape(-1)
    columns = []
    for start in range(0, n_in, _CHUNK):
        basis = torch.eye(n_in, dtype=torch.float64)[start:start + _CHUNK].reshape(-1, *source_shape)
        columns.append(_evaluate(run, basis).reshape(basis.shape[0], -1) - base)
    return matrix_norm(torch.cat(columns).T)


_CHUNK = 256  # basis vectors evaluated together


def _evaluate(run: Any, basis: torch.Tensor) -> torch.Tensor:
    """run(b) for each basis vector b: vmapped, or one by one for ops vmap does not batch."""
    try:
        return torch.func.vmap(run)(basis)
    except Exception:
        return torch.stack([run(b) for b in basis])
