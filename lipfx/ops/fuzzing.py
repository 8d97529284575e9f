"""Fuzz generators for op table entries, and the check they feed.

Each entry's ``fuzz(key, generator)`` returns legal calls of the op (:class:`FuzzCase`). The
check (:func:`check_case`) certifies the call as a one-op network and compares the certificate
with an independent lower bound on the true Lipschitz constant: the largest secant quotient
``||f(x) - f(y)|| / ||x - y||`` over random pairs, evaluated without autograd; the op runs in
float64 throughout (module, inputs and captured constants). A
certificate below that quotient is unsound.

Generators are built from a few helpers: :func:`apply` turns a key into a callable (a module
type is instantiated with the arguments, a function or method is called with them after the
inputs), :func:`unary` gives one-input calls at several shapes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import ArgumentError
from .table import FuzzCase, Key, OpEntry, node_entry, scoped, table

SHAPES = ((3, 8), (2, 3, 5), (2, 3, 6, 5))


def apply(key: Key, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """``key`` as a callable: a module instance, or a call with ``args`` after the inputs."""
    if isinstance(key, type):
        return key(*args, **kwargs)
    if isinstance(key, str):
        return lambda x, *rest: getattr(x, key)(*rest, *args, **kwargs)
    return lambda *xs: key(*xs, *args, **kwargs)


def randn(shape: Sequence[int], g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """float64, like everything the check runs (constants a generator captures included)."""
    return scale * torch.randn(tuple(shape), generator=g, dtype=torch.float64)


def unary(*shapes: Sequence[int], args: tuple = (), kwargs: Optional[dict] = None,
          scale: float = 1.0) -> Callable[[Key, torch.Generator], list[FuzzCase]]:
    """A generator of one-input calls ``key(x, *args, **kwargs)`` at each shape (default SHAPES)."""
    shapes = shapes or SHAPES

    def gen(key: Key, g: torch.Generator) -> list[FuzzCase]:
        return [FuzzCase(apply(key, *args, **(kwargs or {})), (randn(s, g, scale),), f"shape {tuple(s)}")
                for s in shapes]

    return gen


def cases(*builders: Callable[[Key, torch.Generator], FuzzCase]) -> Callable[[Key, torch.Generator], list[FuzzCase]]:
    """A generator from one-case builders ``builder(key, g) -> FuzzCase``."""
    return lambda key, g: [b(key, g) for b in builders]


class Probe(nn.Module):
    """A one-op network of one input: calls the case's op (as a submodule if it is one)."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        super().__init__()
        if isinstance(forward, nn.Module):
            self.op = forward
        else:
            self.fn = forward

    def call(self, *xs: torch.Tensor) -> Any:
        return self.op(*xs) if hasattr(self, "op") else self.fn(*xs)

    def forward(self, x: torch.Tensor) -> Any:  # fx traces fixed arities only
        return self.call(x)


class Probe2(Probe):
    """A one-op network of two inputs."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return self.call(x, y)


def _flat(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).double()
    if isinstance(value, (list, tuple)):
        parts = [_flat(v) for v in value]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return torch.zeros(0, dtype=torch.float64)


def _quotient(f: Callable[..., Any], base: list[torch.Tensor], moved: list[torch.Tensor]) -> float:
    dx = torch.linalg.vector_norm(torch.cat([(m - b).reshape(-1) for m, b in zip(moved, base)]))
    fb, fm = _flat(f(*[b.clone() for b in base])), _flat(f(*[m.clone() for m in moved]))  # (in-place ops)
    if fb.shape != fm.shape or dx == 0:
        return 0.0
    return float(torch.linalg.vector_norm(fm - fb) / dx)


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    parts, start = [], 0
    for x in like:
        parts.append(flat[start:start + x.numel()].reshape(x.shape))
        start += x.numel()
    return parts


_MAX_DIRECTIONS = 400  # finite-difference Jacobians over at most this many input coordinates


@torch.no_grad()
def secant_lower_bound(forward: Callable[..., Any], inputs: Sequence[torch.Tensor], g: torch.Generator,
                       pairs: int = 24) -> float:
    """A lower bound on the Lipschitz constant from secant quotients ||f(x) - f(y)|| / ||x - y||,
    in float64, without autograd. Every number it returns is a real quotient of two evaluations.

    Candidates: random pairs near and far; and, at random and at "peaked" base points (one large
    entry, where max-type ops route many outputs through one input), the top singular direction
    of a finite-difference Jacobian, along which the quotient is then measured. Each pair moves
    every input jointly (the certificate bounds the map from all inputs at once).
    """
    f = forward
    xs = [x.double() for x in inputs]
    best = 0.0
    for i in range(pairs):
        step = 10.0 ** (-3 + 3 * (i % 4) / 3)  # 1e-3 .. 1: local slopes and global secants
        base = [x + torch.randn(x.shape, generator=g, dtype=torch.float64) * (i % 3) for x in xs]
        moved = [b + step * torch.randn(b.shape, generator=g, dtype=torch.float64) for b in base]
        best = max(best, _quotient(f, base, moved))
    n = sum(x.numel() for x in xs)
    if n > _MAX_DIRECTIONS:
        return best
    flat = torch.cat([x.reshape(-1) for x in xs])
    peaked = 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    peaked[int(torch.randint(n, (1,), generator=g))] = 3.0
    for point in (flat, peaked, torch.zeros(n, dtype=torch.float64) + 0.1):
        base = _split(point, xs)
        out = f(*[b.clone() for b in base])
        if any(t.dtype != torch.float64 for t in (out if isinstance(out, (list, tuple)) else (out,))
               if isinstance(t, torch.Tensor)):
            break  # outputs rounded to a lower precision: finite differences would measure the rounding
        f0 = _flat(out)
        h = 1e-6
        columns = []
        for j in range(n):
            e = point.clone()
            e[j] += h
            fj = _flat(f(*_split(e, xs)))
            if fj.shape != f0.shape:
                columns = []
                break
            columns.append((fj - f0) / h)
        if not columns or f0.numel() == 0:
            continue
        jac = torch.stack(columns, dim=1)
        v = torch.linalg.svd(jac, full_matrices=False).Vh[0]
        for step in (h, 1e-3):
            best = max(best, _quotient(f, base, _split(point + step * v, xs)))
    return best


def check_case(case: FuzzCase, g: torch.Generator, entry: Optional[OpEntry] = None) -> tuple[float, float]:
    """(certificate, secant lower bound) of one case; raises AssertionError when unsound, or when
    ``entry`` is given and no node of the traced case is certified by it (a vacuous case)."""
    from ..certify import certificate  # the walk imports the table: import it at call time
    from ..tracing import trace

    if len(case.inputs) not in (1, 2):
        raise ArgumentError(f"{case.note}: fuzz cases take one or two inputs, got {len(case.inputs)}")
    probe = (Probe if len(case.inputs) == 1 else Probe2)(case.forward).double().eval()
    gm = trace(probe, leaf_modules=("op",) if hasattr(probe, "op") else ())  # the op stays one node
    if entry is not None:
        modules = dict(gm.named_modules())
        if not any(node_entry(n, modules) is entry for n in gm.graph.nodes):
            raise AssertionError(f"{case.note}: the traced case never reaches the entry {entry.keys[:3]}")
    bound = certificate(gm, case.inputs).bound
    lower = secant_lower_bound(probe, case.inputs, g)
    if lower > bound * (1 + case.rtol) + 1e-12:
        raise AssertionError(f"{case.note}: certificate {bound:.6g} < secant quotient {lower:.6g}")
    return bound, lower


def check_entry(entry: OpEntry, seed: int = 0) -> list[tuple[Key, float, float]]:
    """Run every key's fuzz cases of ``entry`` through :func:`check_case`."""
    if entry.fuzz is None:
        raise ArgumentError(f"the op table entry for {entry.keys} has no fuzz generator")
    out = []
    g = torch.Generator().manual_seed(seed)
    with scoped():
        table().add(entry)  # certify with this entry's rule, whatever the table holds
        for key in entry.keys:
            for case in entry.fuzz(key, g):
                try:
                    bound, lower = check_case(case, g, entry)
                except AssertionError as exc:
                    raise AssertionError(f"{key!r}: {exc}") from None
                out.append((key, bound, lower))
    return out


class Chain(nn.Module):
    """Fuzz cases of several entries run one after another. Each op's inputs come from the value
    before it through fixed random matrices (flattened value @ M, reshaped to the input's shape),
    so any op can follow any other; the first op's first input is the chain's input itself."""

    def __init__(self, cases: Sequence[FuzzCase], maps: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(c.forward if isinstance(c.forward, nn.Module) else nn.Identity() for c in cases)
        self.fns = [None if isinstance(c.forward, nn.Module) else c.forward for c in cases]
        self.shapes = [[tuple(x.shape) for x in c.inputs] for c in cases]
        self.maps = nn.ParameterList(nn.Parameter(m, requires_grad=False) for m in maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, k = x, 0
        for i, shapes in enumerate(self.shapes):
            args = []
            for j, shape in enumerate(shapes):
                if i == 0 and j == 0:
                    args.append(value)
                else:
                    args.append((value.reshape(-1) @ self.maps[k]).reshape(shape))
                    k += 1
            value = (self.fns[i] or self.ops[i])(*args)
            if isinstance(value, (tuple, list)):  # chunk, split, max(dim): go on with the first part
                value = value[0]
        return value


@torch.no_grad()
def random_chain(entries: Sequence[OpEntry], g: torch.Generator, length: int) -> Optional[tuple[Chain, torch.Tensor]]:
    """A :class:`Chain` of ``length`` fuzz cases drawn from ``entries``, and its input; None when a
    drawn op has no usable case (an unbounded op, or one whose output is not a float tensor)."""
    cases, maps = [], []
    value = None
    for i in range(length):
        entry = entries[int(torch.randint(len(entries), (1,), generator=g))]
        key = entry.keys[int(torch.randint(len(entry.keys), (1,), generator=g))]
        drawn = [c for c in entry.fuzz(key, g) if len(c.inputs) in (1, 2) and c.rtol <= 1e-6]
        if not drawn:
            return None
        case = drawn[int(torch.randint(len(drawn), (1,), generator=g))]
        forward = case.forward.double() if isinstance(case.forward, nn.Module) else case.forward
        case = FuzzCase(forward, tuple(x.double() for x in case.inputs), case.note)
        args = []
        for j, x in enumerate(case.inputs):
            if i == 0 and j == 0:
                args.append(x)
                continue
            source = case.inputs[0] if i == 0 else value
            m = torch.randn(source.numel(), x.numel(), generator=g, dtype=torch.float64) / source.numel() ** 0.5
            maps.append(m)
            args.append((source.reshape(-1) @ m).reshape(x.shape))
        value = forward(*[a.clone() for a in args])
        value = value[0] if isinstance(value, (tuple, list)) else value
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
            return None
        cases.append(case)
    return Chain(cases, maps).eval(), cases[0].inputs[0]
