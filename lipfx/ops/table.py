"""The op table: one entry per op kind, holding every piece of lipfx that knows about it.

Keys live in one space, as in torch.ao's backend configs and auto_LiRPA's bound-op map: a module
type (``call_module`` nodes, matched through the type's MRO), a function (``call_function``) or
a method name string (``call_method``, ``x.name(...)``). One :class:`OpEntry` lists its keys and
its pieces:

- ``rule(ctx) -> Step``: the certificate rule (required);
- ``fuzz(key, generator) -> FuzzCase``: legal calls of the op, for the soundness fuzzer (required);
- ``linear_map(module, name, input_shape) -> LinearMap | None``: the op as one linear map, so the
  certificate can compose it with its neighbours;
- ``layer_bound(module, input_shape, method, label) -> float``: the operator norm of a weighted
  layer (:func:`lipfx.layer_bound`);
- ``normalization(module, input_shapes, K, options, name) -> LipschitzNormalization`` and
  ``attribute``: how ``lipfx.normalize`` keeps the layer's norm at K;
- ``sum_sign``: +1 / -1 for binary sums and differences (residual maps compose through them);
- ``size_free``: the rule's constant is the same at every input size (elementwise ops, shape
  ops of norm 1, and weighted layers under resolution-free bounds), so a certificate made of such
  ops holds at every input size (``InvertibleResidual`` without example inputs);
- ``leaf``: module types traced as one node (the tracer does not inline them), so their rule
  is the one used.

Registrations go into the active :class:`OpTable`; :func:`scoped` gives a block its own copy,
so tests and users can register and drop rules without leaking them.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import nn

Key = Any  # a module type, a function, or a method name


class FuzzCase(NamedTuple):
    """One legal call of an op: ``forward(*inputs)`` computes it (``module`` holds any state)."""

    forward: Callable[..., Any]
    inputs: tuple[torch.Tensor, ...]
    note: str = ""
    rtol: float = 1e-6  # for ops that round (a cast to float32): the rounding in the secant


@dataclass(frozen=True)
class OpEntry:
    """Everything lipfx knows about one op kind (see the module docstring for each piece)."""

    keys: tuple[Key, ...]
    rule: Callable
    fuzz: Optional[Callable[[Key, torch.Generator], Sequence[FuzzCase]]] = None
    linear_map: Optional[Callable] = None
    layer_bound: Optional[Callable] = None
    normalization: Optional[Callable] = None
    attribute: str = "weight"
    sum_sign: Optional[float] = None
    size_free: bool = False
    leaf: bool = False
    doc: str = ""

    def missing(self) -> list[str]:
        """The pieces this entry needs and lacks (a test enumerates the table with this)."""
        out = [piece for piece in ("rule", "fuzz") if getattr(self, piece) is None]
        if self.layer_bound is not None or self.normalization is not None:
            # a weighted layer: lipfx bounds it, normalizes it and composes it with its neighbours
            out += [p for p in ("layer_bound", "normalization", "linear_map") if getattr(self, p) is None]
        return out


def _kind(key: Key) -> str:
    if isinstance(key, str):
        return "method"
    if isinstance(key, type):
        if not issubclass(key, nn.Module):
            raise TypeError(f"op table keys that are types must be nn.Module subclasses, got {key!r}")
        return "module"
    if callable(key):
        return "function"
    raise TypeError(f"op table key must be a module type, a function or a method name, got {key!r}")


@dataclass
class OpTable:
    """Entries by key. Module types are looked up through their MRO (subclasses inherit)."""

    _entries: dict[Any, OpEntry] = field(default_factory=dict)

    def add(self, entry: OpEntry) -> OpEntry:
        for key in entry.keys:
            _kind(key)
            self._entries[key] = entry
        return entry

    def remove(self, *keys: Key) -> None:
        for key in keys:
            self._entries.pop(key, None)

    def entry(self, key: Key) -> Optional[OpEntry]:
        """The entry for a key. A module type resolves through its MRO, except that a subclass
        overriding ``forward`` does not inherit a leaf entry (it computes something else, and
        traced through it is certified as what it does)."""
        if isinstance(key, type):
            for cls in key.__mro__:
                if cls in self._entries:
                    e = self._entries[cls]
                    if e.leaf and cls is not key and getattr(key, "forward", None) is not getattr(cls, "forward", None):
                        return None
                    return e
            return None
        try:
            return self._entries.get(key)
        except TypeError:  # an unhashable call_function target
            return None

    def entries(self) -> list[OpEntry]:
        """Every distinct entry, in registration order."""
        seen: dict[int, OpEntry] = {}
        for e in self._entries.values():
            seen.setdefault(id(e), e)
        return list(seen.values())

    def copy(self) -> "OpTable":
        return OpTable(dict(self._entries))


_DEFAULT = OpTable()
_ACTIVE: contextvars.ContextVar[OpTable] = contextvars.ContextVar("lipfx_op_table", default=_DEFAULT)


def table() -> OpTable:
    """The op table in effect (the default one, or the innermost :func:`scoped` copy)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def scoped() -> Iterator[OpTable]:
    """Registrations inside the block go to a copy of the table, dropped when the block ends::

        with lipfx.ops.scoped():
            lipfx.ops.register(MyLayer, rule=..., fuzz=...)
            lipfx.certificate(net, x)
    """
    token = _ACTIVE.set(table().copy())
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def register(*keys: Key, rule: Callable, fuzz: Optional[Callable] = None, leaf: Optional[bool] = None,
             **pieces: Any) -> OpEntry:
    """Add one entry for ``keys`` to the active table (replacing what those keys had).

    A module type registered here is traced as a leaf (``leaf=True``) unless it is one of
    torch's own (already leaves) or ``leaf=False`` is given: otherwise torch.fx would inline its
    forward and the rule would never be used. A subclass of a registered layer (an ``nn.Conv2d``
    subclass, say) keeps the pieces it is not given (layer bound, linear map, normalization).

    Scopes (:func:`scoped`) follow ``contextvars``: a thread started inside one sees the default
    table, not the scope's.
    """
    if leaf is None:
        leaf = any(isinstance(k, type) and not k.__module__.startswith("torch.") for k in keys)
    inherited = lookup(keys[0]) if len(keys) == 1 and isinstance(keys[0], type) else None
    if inherited is not None:  # a subclass of a registered layer keeps its bound, map and normalization
        for piece in ("linear_map", "layer_bound", "normalization", "attribute", "size_free"):
            pieces.setdefault(piece, getattr(inherited, piece))
    return table().add(OpEntry(tuple(keys), rule, fuzz, leaf=leaf, **pieces))


def unregister(*keys: Key) -> None:
    """Drop the entries of ``keys`` from the active table (other keys of an entry stay)."""
    table().remove(*keys)


def lookup(key: Key) -> Optional[OpEntry]:
    """The active table's entry for a module type, function or method name, or None."""
    return table().entry(key)


def entries() -> list[OpEntry]:
    """Every distinct entry of the active table."""
    return table().entries()


def node_entry(node, modules: dict) -> Optional[OpEntry]:
    """The active table's entry for an fx node: by module type for ``call_module`` (``modules``
    maps qualified names to modules), by target for functions and methods; None otherwise."""
    if node.op == "call_module":
        return lookup(type(modules[node.target]))
    if node.op in ("call_function", "call_method"):
        return lookup(node.target)
    return None


def key_name(key: Key) -> str:
    """A key as a short name: the method name, or the type's or function's ``__name__``."""
    return key if isinstance(key, str) else getattr(key, "__name__", repr(key))


def is_leaf(module: nn.Module) -> bool:
    """Whether the tracer keeps ``module`` as one node because its entry says so."""
    e = lookup(type(module))
    return e is not None and e.leaf


def _decorator(keys: tuple, **pieces: Any) -> Callable[[Callable], Callable]:
    def deco(rule: Callable) -> Callable:
        register(*keys, rule=rule, **pieces)
        return rule

    return deco


def register_module_rule(*types: type, fuzz: Optional[Callable] = None) -> Callable[[Callable], Callable]:
    """Decorator form of :func:`register` for module types (traced as leaves from then on)."""
    return _decorator(types, fuzz=fuzz)


def register_function_rule(*functions: Callable, fuzz: Optional[Callable] = None) -> Callable[[Callable], Callable]:
    """Decorator form of :func:`register` for ``call_function`` targets."""
    return _decorator(functions, fuzz=fuzz)


def register_method_rule(*names: str, fuzz: Optional[Callable] = None) -> Callable[[Callable], Callable]:
    """Decorator form of :func:`register` for method names (``x.name(...)``)."""
    return _decorator(names, fuzz=fuzz)
