"""The certificate as data: one :class:`NodeRecord` per graph node, and the :class:`Certificate`
that holds them (its bound, critical path, re-evaluation with scaled layers, table and JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional


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
    def label(self) -> str:
        """The node's name everywhere lipfx prints it: the module's dotted name for a module call
        (``layer1.0.conv1``), else the fx node's name (``add_3``)."""
        return self.target if self.target not in (self.op, self.name) and self.op not in ("placeholder", "output") else self.name

    @property
    def what(self) -> str:
        """The module (or the '+'-joined modules of a composed map) behind this node's constant."""
        return ("+".join(self.layers) or self.target) if self.uses_composed else self.target


@dataclass
class Culprit:
    """A node that makes the bound infinite."""

    node: str  # the module's dotted name for a module call, else the fx node's name
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

    def critical_layers(self) -> list[str]:
        """The critical path as the command line prints it: the nodes on it whose constant is not
        1 (layers, pools, composed maps), each by its module's name ('+'-joined for a composed
        map) or its op."""
        return [r.what for r in self.critical_path()
                if r.op not in ("placeholder", "output") and (r.local != 1.0 or r.composed is not None)]

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
            "critical_path": self.critical_layers(),
            "nodes": [{"label": r.label, **{k: _json_number(v) for k, v in asdict(r).items()}} for r in self.records],
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
            lines.append(f"{r.label[:34]:<34} {r.op[:22]:<22} {_fmt(r.local):>11} {_fmt(r.bound):>11}  {method}")
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


