"""``lipfx.certificate``: a sound Lipschitz bound for a whole network (MATH section 8).

The torch.fx graph becomes a networkx DAG, walked in topological order. L(node) bounds the
Lipschitz constant (l2 -> l2, eval semantics) of the node's value as a function of the network
input: inputs have L = 1, nodes that do not depend on the input L = 0, and every other node
gets L from its rule (:mod:`lipfx.certify.registry`). Linear subgraphs are also bounded as one
operator (:mod:`lipfx.certify.linear_chains`) and the smaller of the two numbers is kept.
"""

from __future__ import annotations

import builtins
import json
import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from ..errors import LipfxError
from ..norms import METHODS
from ..tracing import Inputs, as_tuple, eval_mode, trace
from . import activations, rules
from .linear_chains import LinearMap, add, compose, identity, module_map, sole_user
from .dense import DENSE_MAX, linear_region, region_norm
from .registry import NodeContext, Step, Unbounded, find_rule, numel, op_name

_RULE_MODULES = (activations, rules)  # imported for their registrations
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
_ADDS = {operator.add: 1.0, operator.iadd: 1.0, torch.add: 1.0, operator.sub: -1.0, operator.isub: -1.0, torch.sub: -1.0}


@dataclass
class NodeRecord:
    """One graph node of the certificate."""

    name: str  # fx node name
    op: str  # module type, function or method, e.g. 'Conv2d', 'operator.add'
    target: str  # module name for call_module nodes, else the op
    local: float  # the op's own Lipschitz constant (its largest factor)
    method: str  # how ``local`` was obtained
    bound: float  # cumulative: Lipschitz constant of this node's value w.r.t. the network input
    inputs: tuple[str, ...] = ()  # input-dependent input nodes, in argument order
    factors: tuple[float, ...] = ()  # per input: bound = combine(factors[i] * bound(inputs[i]))
    combine: str = "sum"
    reason: Optional[str] = None  # why the op has no bound (local = inf)
    product: Optional[float] = None  # composed linear maps: the cumulative bound from the parts
    composed: Optional[float] = None  # ... and from the whole map (``bound`` is the smaller)
    source: Optional[str] = None  # the node the composed map starts from
    map_bound: Optional[float] = None  # bound on the composed map's norm alone
    layers: tuple[str, ...] = ()  # modules in the composed map
    homogeneous: bool = True  # the map scales with the product of its layers' scales
    composed_method: Optional[str] = None  # 'composed conv of k ops' or 'dense region of k ops'

    @property
    def uses_composed(self) -> bool:
        """Whether ``bound`` came from the composed map rather than the chain rule over the parts."""
        return self.composed is not None and self.composed <= (self.product if self.product is not None else math.inf)

    @property
    def own(self) -> float:
        """The constant this node contributes: its composed map's where that bound was used."""
        return self.map_bound if self.uses_composed else self.local

    @property
    def what(self) -> str:
        """The module (or the '+'-joined modules of a composed map) behind this node's constant."""
        return ("+".join(self.layers) or self.target) if self.uses_composed else self.target


@dataclass
class Culprit:
    """A node that makes the bound infinite."""

    node: str
    op: str
    reason: str


@dataclass
class Certificate:
    """A sound upper bound on a network's Lipschitz constant, with the per-node derivation."""

    bound: float
    records: list[NodeRecord]
    unbounded: list[Culprit] = field(default_factory=list)
    input_shapes: tuple[tuple[int, ...], ...] = ()
    method: str = "auto"

    def record(self, name: str) -> NodeRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)

    def critical_path(self) -> list[NodeRecord]:
        """The chain of nodes, input to output, whose factors dominate the bound.

        Walks back from the output, at each node through the input with the largest
        contribution (or the source of its composed linear map when that bound was used).
        """
        by_name = {r.name: r for r in self.records}
        path: list[NodeRecord] = []
        node = self.records[-1] if self.records else None
        while node is not None:
            path.append(node)
            if node.uses_composed:
                node = by_name.get(node.source)
                continue
            if not node.inputs:
                break
            best = max(range(len(node.inputs)), key=lambda i: _times(node.factors[i], by_name[node.inputs[i]].bound))
            node = by_name[node.inputs[best]]
        return path[::-1]

    def dominant(self, k: int = 5) -> list[NodeRecord]:
        """The ``k`` nodes with the largest own constants on the critical path."""
        return sorted(self.critical_path(), key=lambda r: -r.own)[:k]

    def evaluate(self, scales: Mapping[str, float]) -> float:
        """The bound if each named module's weight were multiplied by ``scales[name]``.

        Re-runs the chain rule with scaled factors (no new norm computations). Composed maps
        that are products of layers scale exactly; sums (residual maps) fall back to the parts.
        """
        values: dict[str, float] = {}
        for r in self.records:
            s = scales.get(r.target, 1.0) if r.op not in ("placeholder", "output") else 1.0
            if r.op == "placeholder":
                values[r.name] = 1.0
                continue
            if math.isinf(r.local) and not r.inputs:
                values[r.name] = math.inf
                continue
            terms = [_times(f * s, values[i]) for f, i in zip(r.factors, r.inputs)]
            value = _combine(terms, r.combine) if not math.isinf(r.local) else math.inf
            if r.map_bound is not None and r.homogeneous:
                factor = math.prod(scales.get(layer, 1.0) for layer in r.layers)
                value = min(value, _times(r.map_bound * factor, values[r.source]))
            values[r.name] = value
        return values[self.records[-1].name] if self.records else 0.0

    def to_dict(self) -> dict:
        return {
            "bound": _json_number(self.bound),
            "method": self.method,
            "input_shapes": [list(s) for s in self.input_shapes],
            "unbounded": [asdict(c) for c in self.unbounded],
            "critical_path": [r.name for r in self.critical_path()],
            "nodes": [{k: _json_number(v) for k, v in asdict(r).items()} for r in self.records],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, all_nodes: bool = False) -> str:
        """Per-node table; by default only nodes whose constant is not 1 (layers, pools, ...)."""
        lines = [f"{'node':<34} {'op':<22} {'local':>11} {'cumulative':>11}  method"]
        for r in self.records:
            if not all_nodes and r.local == 1.0 and r.composed is None and r.op not in ("placeholder", "output"):
                continue
            method = r.method
            if r.composed is not None:
                method += f" | {r.composed_method}: {_fmt(r.composed)} vs parts {_fmt(r.product)}"
            lines.append(f"{r.name[:34]:<34} {r.op[:22]:<22} {_fmt(r.local):>11} {_fmt(r.bound):>11}  {method}")
        return "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.table(), "", f"Lipschitz bound (l2, eval mode): {_fmt(self.bound)}"]
        if self.unbounded:
            parts.append("unbounded because of:")
            parts += [f"  {c.node} ({c.op}): {c.reason}" for c in self.unbounded]
        else:
            top = [r for r in self.dominant() if r.own > 1.0]
            if top:
                parts.append("dominated by: " + ", ".join(f"{r.what} ({_fmt(r.own)})" for r in top))
        return "\n".join(parts)


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.4g}"


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else str(v)
    if isinstance(v, tuple):
        return [_json_number(x) for x in v]
    return v


def _times(factor: float, value: float) -> float:
    # a zero factor makes a constant, even of an unbounded input
    return 0.0 if factor == 0.0 or value == 0.0 else factor * value


def _combine(terms: list[float], how: str) -> float:
    if how == "l2":
        return math.sqrt(sum(t * t for t in terms)) if all(math.isfinite(t) for t in terms) else math.inf
    return sum(terms)


# --- observation: shapes, constants, input dependence -----------------------------------------
def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return node.args[1] in _SHAPE_ATTRS
        return node.target is builtins.len
    return False


def _dependent(graph: fx.Graph) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or (
            n.op != "get_attr" and not _is_shape_query(n) and any(a in dep for a in n.all_input_nodes)
        ):
            dep.add(n)
    return dep


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (list, tuple)):
        return tuple(_shape_of(v) for v in value)
    return None


class _Observer(fx.Interpreter):
    """Runs the graph once: every node's shape, and the values of input-independent nodes."""

    def __init__(self, gm: fx.GraphModule, dependent: set[fx.Node]) -> None:
        super().__init__(gm)
        self.dependent = dependent
        self.shapes: dict[fx.Node, Any] = {}
        self.constants: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = _shape_of(result)
        if n not in self.dependent:
            self.constants[n] = result
        return result


def _flat_inputs(node: fx.Node, dependent: set[fx.Node]) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a))
    return [a for a in found if a in dependent]


# --- linear forms -----------------------------------------------------------------------------
@dataclass
class _Form:
    source: fx.Node
    map: LinearMap
    homogeneous: bool


def _linear_forms(modules: dict, order: list[fx.Node], shapes: dict, dependent: set) -> dict[fx.Node, _Form]:
    """The composed linear map ending at each node (only maximal ones are kept)."""
    forms: dict[fx.Node, _Form] = {}
    absorbed: set[fx.Node] = set()

    def base(u: fx.Node) -> Optional[_Form]:
        return forms.get(u) if u in forms and sole_user(u) else None

    for n in order:
        if n not in dependent or not n.args or not isinstance(shapes.get(n), torch.Size):
            continue
        if n.op == "call_module":
            u = n.args[0]
            if not isinstance(u, fx.Node) or len(n.args) != 1 or n.kwargs or not isinstance(shapes.get(u), torch.Size):
                continue
            m = module_map(modules[n.target], n.target, shapes[u])
            if m is None:
                continue
            b = base(u)
            c = compose(m, b.map) if b is not None else None
            if c is not None:
                forms[n] = _Form(b.source, c, b.homogeneous)
                absorbed.add(u)
            else:
                forms[n] = _Form(u, m, True)
        elif n.op == "call_function" and n.target in _ADDS and len(n.args) == 2 and not n.kwargs:
            a, b_ = n.args
            if not all(isinstance(x, fx.Node) and x in dependent and shapes.get(x) == shapes[n] for x in (a, b_)):
                continue
            parts = []
            for x in (a, b_):
                f = base(x)
                if f is None:
                    if len(shapes[x]) < 2:
                        break
                    f = _Form(x, identity(int(shapes[x][1]), len(shapes[x]) - 2), True)
                parts.append(f)
            if len(parts) != 2 or parts[0].source is not parts[1].source:
                continue
            src = parts[0].source
            summed = add(parts[0].map, parts[1].map, _ADDS[n.target], tuple(shapes[src][2:]), tuple(shapes[n][2:]))
            if summed is not None:
                forms[n] = _Form(src, summed, False)
                absorbed.update(x for x in (a, b_) if x in forms)
    return {n: f for n, f in forms.items() if n not in absorbed and f.map.pieces >= 2}


# --- the walk ---------------------------------------------------------------------------------
def _dag(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
    return g


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
        model: a converted model (``lipfx.convert``) or any torch.fx-traceable module; it is
            evaluated in eval mode and left in the mode it was in.
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
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    with eval_mode(model):
        gm = model if isinstance(model, fx.GraphModule) else trace(model, leaf_modules)
        gm.eval()
        inputs = as_tuple(example_inputs)
        dependent = _dependent(gm.graph)
        observer = _Observer(gm, dependent)
        with torch.no_grad():
            try:
                observer.run(*inputs)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise LipfxError(f"the model does not run on the example inputs: {type(exc).__name__}: {first}") from exc
        return _walk(gm, observer, dependent, method, compose_linear, dense_max, inputs)


def _steps(modules, order, dependent, inputs, shapes, constants, method) -> tuple[dict, dict]:
    """Pass 1: every input-dependent node's rule (independent of the bounds themselves)."""
    steps: dict[fx.Node, Step] = {}
    reasons: dict[fx.Node, str] = {}
    for n in order:
        if n not in dependent or n.op == "placeholder":
            continue
        ins = inputs[n]
        if n.op == "output":
            steps[n] = Step(tuple(1.0 for _ in ins), "network output", combine="l2")
            continue
        module = modules.get(n.target) if n.op == "call_module" else None
        ctx = NodeContext(n, module, n.target if module is not None else None, ins, shapes, constants, method)
        rule = find_rule(n, module)
        try:
            if rule is None:
                raise Unbounded(
                    f"{ctx.label}: no Lipschitz rule for {ctx.op_name}; register one with "
                    "lipfx.certify.register_module_rule / register_function_rule / register_method_rule"
                )
            step = rule(ctx)
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


def _walk(gm, observer: _Observer, dependent, method: str, compose_linear: bool, dense_max: int, inputs) -> Certificate:
    dag = _dag(gm.graph)
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    order = list(nx.lexicographical_topological_sort(dag, key=index.__getitem__))  # fx order where free
    shapes, constants = observer.shapes, observer.constants
    modules = dict(gm.named_modules())
    node_inputs = {n: _flat_inputs(n, dependent) for n in order if n in dependent}
    steps, reasons = _steps(modules, order, dependent, node_inputs, shapes, constants, method)
    forms = _linear_forms(modules, order, shapes, dependent) if compose_linear else {}
    bound: dict[fx.Node, float] = {}
    records: list[NodeRecord] = []
    for n in order:
        if n not in dependent:
            bound[n] = 0.0
            continue
        module = modules.get(n.target) if n.op == "call_module" else None
        name = op_name(n, module) if n.op not in ("placeholder", "output") else n.op
        target = n.target if n.op == "call_module" else name
        ins = node_inputs[n]
        if n.op == "placeholder":
            bound[n] = 1.0
            records.append(NodeRecord(n.name, name, str(target), 1.0, "network input", 1.0))
            continue
        step, reason = steps[n], reasons.get(n)
        value = math.inf if reason else _combine([_times(f, bound[i]) for f, i in zip(step.factors, ins)], step.combine)
        rec = NodeRecord(n.name, name, str(target), math.inf if reason else step.local, step.method, value,
                         tuple(i.name for i in ins), tuple(step.factors), step.combine, reason)
        if compose_linear and not reason:
            value = _compose_bounds(gm, n, rec, forms.get(n), steps, dependent, index, shapes, constants, bound,
                                    dense_max)
        bound[n] = value
        records.append(rec)
    output = next(n for n in reversed(order) if n.op == "output")
    total = bound[output]
    unbounded = []
    if math.isinf(total):
        upstream = nx.ancestors(dag, output)
        unbounded = [Culprit(n.name, op_name(n, modules.get(n.target) if n.op == "call_module" else None), r)
                     for n, r in reasons.items() if n in upstream]
    return Certificate(total, records, unbounded, tuple(tuple(x.shape) for x in inputs), method)


def _compose_bounds(gm, n, rec: NodeRecord, form, steps, dependent, index, shapes, constants, bound,
                    dense_max: int) -> float:
    """Bound the linear map ending at ``n`` as one operator where that is tighter; updates ``rec``."""
    candidates = []  # (cumulative bound, map bound, source, layers, homogeneous, how)
    if form is not None:
        label = f"composed map {' -> '.join(form.map.layers) or n.name}"
        b = form.map.bound(tuple(shapes[form.source][1:]), label)
        candidates.append((_times(b, bound[form.source]), b, form.source, form.map.layers, form.homogeneous,
                           f"composed conv of {form.map.pieces} ops"))
    step = steps.get(n)
    users = [u for u in n.users if u in dependent]
    is_end = step is not None and step.linear and not (len(users) == 1 and steps.get(users[0]) is not None
                                                        and steps[users[0]].linear and users[0].op != "output")
    if is_end:
        region = linear_region(n, steps, dependent, index)
        if region is not None:
            source, nodes = region
            if isinstance(shapes.get(source), torch.Size) and isinstance(shapes.get(n), torch.Size) and (
                numel(shapes[source]) * numel(shapes[n]) <= dense_max
            ):
                b = region_norm(gm, source, nodes, constants, shapes[source])
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
