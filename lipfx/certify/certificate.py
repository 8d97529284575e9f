"""``lipfx.certificate``: a sound Lipschitz bound for a whole network (docs/math.md, section 8).

The torch.fx graph becomes a networkx DAG, walked in topological order. L(node) bounds the
Lipschitz constant (l2 -> l2, eval semantics) of the node's value as a function of the network
input: inputs have L = 1, nodes that do not depend on the input L = 0, and every other node
gets L from the rule of its op table entry (:mod:`lipfx.ops`). Linear subgraphs are also bounded
as one operator (:mod:`lipfx.certify.linear_chains`, :mod:`lipfx.certify.dense`) and the smaller
of the two numbers is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from ..errors import ArgumentError, LipfxError
from ..norms import METHODS
from ..ops.context import NodeContext, Step, Unbounded, numel, op_name
from ..ops.table import node_entry
from ..tracing import Inputs, as_tuple, check_inputs, check_model, eval_mode, trace, wrap_torch_layer
from .dense import DENSE_MAX, linear_region, region_norm
from .linear_chains import Form, linear_forms
from .aliasing import mutation_reasons
from .observe import Observer, dependent_nodes, flat_inputs, non_real_reason
from .records import Certificate, Culprit, NodeRecord, _combine, _times


@dataclass
class _Graph:
    """Everything the walk knows about the traced graph, observed once before any bound."""

    gm: fx.GraphModule
    modules: dict[str, nn.Module]
    order: list[fx.Node]  # topological, fx order where free
    index: dict[fx.Node, int]  # fx order
    dependent: set[fx.Node]  # nodes that depend on the network input
    inputs: dict[fx.Node, list[fx.Node]]  # each dependent node's dependent inputs, in argument order
    shapes: dict[fx.Node, Any]
    dtypes: dict[fx.Node, torch.dtype]  # of the nodes whose value is one tensor
    constants: dict[fx.Node, Any]  # values of the nodes that do not depend on the input
    mutations: dict[fx.Node, str]  # in-place nodes whose mutation a later node reads: why
    method: str  # the layer-bound method
    dense_max: int

    def module(self, n: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(n.target) if n.op == "call_module" else None


def certificate(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    method: str = "auto",
    compose_linear: bool = True,
    dense_max: int = DENSE_MAX,
    leaf_modules: Iterable[str] = (),
) -> Certificate:
    """A sound upper bound on the Lipschitz constant (l2 -> l2, eval mode) of ``model``.

    Args:
        model: a converted model (``lipfx.convert``) or any torch.fx-traceable module (a bare
            torch layer is certified as a one-layer network); it is evaluated in eval mode and
            left in the mode it was in.
        example_inputs: a tensor or tuple of tensors; fixes every layer's input resolution. The
            bound holds for inputs of these shapes; for batch-independent networks (every op lipfx
            bounds, except reductions over the batch dim) it is the per-sample constant.
        method: the layer-bound method (see :func:`lipfx.layer_bound`).
        compose_linear: also bound linear subgraphs as one operator (tighter; each record keeps
            both numbers): chains and residual sums that are one conv, and linear regions whose
            dense matrix has at most ``dense_max`` entries (exact norm of the region).
        leaf_modules: submodule names kept opaque when tracing a plain model.

    Returns:
        A :class:`Certificate`. Its ``bound`` is ``inf`` when some op on the way to the output has
        no global Lipschitz constant; ``unbounded`` then names those nodes and why.
    """
    check_model(model, "lipfx.certificate")
    check_inputs(example_inputs, "lipfx.certificate")
    if method not in METHODS:
        raise ArgumentError(f"unknown method {method!r}; choose from {METHODS}")
    with eval_mode(model):
        gm = model if isinstance(model, fx.GraphModule) else trace(wrap_torch_layer(model), leaf_modules)
        gm.eval()
        inputs = as_tuple(example_inputs)
        dependent = dependent_nodes(gm.graph)
        observer = Observer(gm, dependent)
        with torch.no_grad():
            try:
                observer.run(*inputs)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise LipfxError(f"the model does not run on the example inputs: {type(exc).__name__}: {first}") from exc
        dag = _dag(gm.graph)
        index = {n: i for i, n in enumerate(gm.graph.nodes)}
        order = list(nx.lexicographical_topological_sort(dag, key=index.__getitem__))
        modules = dict(gm.named_modules())
        graph = _Graph(gm, modules, order, index, dependent,
                       {n: flat_inputs(n, dependent) for n in order if n in dependent},
                       observer.shapes, observer.dtypes, observer.constants,
                       mutation_reasons(gm.graph, modules, dependent), method, dense_max)
        return _walk(graph, dag, compose_linear, inputs)


def _dag(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
    return g


def _steps(g: _Graph) -> tuple[dict[fx.Node, Step], dict[fx.Node, str]]:
    """Pass 1: every input-dependent node's rule (independent of the bounds themselves)."""
    steps: dict[fx.Node, Step] = {}
    reasons: dict[fx.Node, str] = {}
    for n in g.order:
        if n not in g.dependent or n.op == "placeholder":
            continue
        ins = g.inputs[n]
        if n.op == "output":
            steps[n] = Step(tuple(1.0 for _ in ins), "network output", combine="l2")
            continue
        module = g.module(n)
        ctx = NodeContext(n, module, n.target if module is not None else None, ins, g.shapes, g.constants, g.method,
                          g.dtypes)
        entry = node_entry(n, g.modules)
        try:
            for why in (non_real_reason(g.dtypes.get(n)), g.mutations.get(n)):
                if why is not None:  # what the node does to values rules out any rule
                    raise Unbounded(f"{ctx.label}: {why}")
            if entry is None:
                raise Unbounded(f"{ctx.label}: no Lipschitz rule for {ctx.op_name}; add one with lipfx.ops.register")
            step = entry.rule(ctx)
        except Unbounded as exc:
            reasons[n] = str(exc)
            step = Step(tuple(math.inf for _ in ins), "unbounded")
        except LipfxError:
            raise
        except Exception as exc:
            raise LipfxError(f"{ctx.label}: its Lipschitz rule failed: {type(exc).__name__}: {exc}") from exc
        if len(step.factors) != len(ins):
            raise LipfxError(f"{ctx.label}: rule gave {len(step.factors)} factors for {len(ins)} inputs")
        steps[n] = step
    return steps, reasons


def _walk(g: _Graph, dag: nx.DiGraph, compose_linear: bool, inputs: tuple) -> Certificate:
    steps, reasons = _steps(g)
    forms = linear_forms(g.modules, g.order, g.shapes, g.dependent, set(reasons)) if compose_linear else {}
    bound: dict[fx.Node, float] = {}
    records: list[NodeRecord] = []
    for n in g.order:
        if n not in g.dependent:
            bound[n] = 0.0
            continue
        name = op_name(n, g.module(n)) if n.op not in ("placeholder", "output") else n.op
        target = n.target if n.op == "call_module" else name
        ins = g.inputs[n]
        if n.op == "placeholder":
            bound[n] = 1.0
            records.append(NodeRecord(n.name, name, str(target), 1.0, "network input", 1.0))
            continue
        step, reason = steps[n], reasons.get(n)
        value = math.inf if reason else _combine([_times(f, bound[i]) for f, i in zip(step.factors, ins)], step.combine)
        rec = NodeRecord(n.name, name, str(target), math.inf if reason else step.local, step.method, value,
                         tuple(i.name for i in ins), tuple(step.factors), step.combine, reason)
        if compose_linear and not reason:
            value = _compose_bounds(g, n, rec, forms.get(n), steps, bound)
        bound[n] = value
        records.append(rec)
    output = next(n for n in reversed(g.order) if n.op == "output")
    total = bound[output]
    unbounded = []
    if math.isinf(total):
        upstream = nx.ancestors(dag, output)
        unbounded = [Culprit(n.target if n.op == "call_module" else n.name, op_name(n, g.module(n)), r)
                     for n, r in reasons.items() if n in upstream]
    return Certificate(total, records, unbounded, tuple(tuple(x.shape) for x in inputs), g.method)


def _compose_bounds(g: _Graph, n: fx.Node, rec: NodeRecord, form: Optional[Form], steps: dict[fx.Node, Step],
                    bound: dict[fx.Node, float]) -> float:
    """Bound the linear map ending at ``n`` as one operator where that is tighter; updates ``rec``."""
    candidates = []  # (cumulative bound, map bound, source, layers, homogeneous, how)
    if form is not None:
        label = f"composed map {' -> '.join(form.map.layers) or n.name}"
        b = form.map.bound(tuple(g.shapes[form.source][1:]), label)
        candidates.append((_times(b, bound[form.source]), b, form.source, form.map.layers, form.homogeneous,
                           f"composed conv of {form.map.pieces} ops"))
    step = steps.get(n)
    users = [u for u in n.users if u in g.dependent]
    is_end = step is not None and step.linear and not (len(users) == 1 and steps.get(users[0]) is not None
                                                        and steps[users[0]].linear and users[0].op != "output")
    if is_end:
        region = linear_region(n, steps, g.dependent, g.index)
        if region is not None:
            source, nodes = region
            if isinstance(g.shapes.get(source), torch.Size) and isinstance(g.shapes.get(n), torch.Size) and (
                numel(g.shapes[source]) * numel(g.shapes[n]) <= g.dense_max
            ):
                try:
                    b = region_norm(g.gm, source, nodes, g.constants, g.shapes[source])
                except (RuntimeError, TypeError):
                    # a module that cannot run in float64 (a parametrization pinned to float32):
                    # no dense tightening here, the chain rule's bound stands
                    b = None
                if b is not None:
                    candidates.append((_times(b, bound[source]), b, source, (), False, f"dense region of {len(nodes)} ops"))
    if not candidates:
        return rec.bound
    best = min(candidates, key=lambda c: c[0])
    rec.product = rec.bound
    rec.composed, rec.map_bound, rec.layers, rec.homogeneous, rec.composed_method = (
        best[0], best[1], best[3], best[4], best[5])
    rec.source = best[2].name
    rec.bound = min(rec.bound, best[0])
    return rec.bound
