"""The op table: every op kind lipfx knows, declared once with all its pieces.

Public API:
- :func:`register` (one entry: ``rule`` and ``fuzz``, and for weighted layers ``layer_bound``,
  ``linear_map``, ``normalization``), :func:`unregister`, :func:`scoped` (a block's own table),
  :func:`lookup`, :func:`entries`;
- :class:`OpEntry`, :class:`FuzzCase`; what a rule sees and returns: :class:`NodeContext`,
  :class:`Step`, :class:`Unbounded`;
- :mod:`lipfx.ops.fuzzing`: generator helpers and the soundness check every entry is run through.

The entries themselves, one file per op family: :mod:`.layers` (weighted layers, BatchNorm),
:mod:`.activations`, :mod:`.pooling`, :mod:`.resampling` (interpolation, padding), :mod:`.shape`,
:mod:`.arithmetic`, :mod:`.extrema` (max, sort, norms), :mod:`.normalizers`, :mod:`.dropout`,
:mod:`.torchvision`.
"""

from .context import NodeContext, Step, Unbounded, constant, unbounded
from .table import (
    FuzzCase,
    OpEntry,
    OpTable,
    entries,
    is_leaf,
    lookup,
    register,
    register_function_rule,
    register_method_rule,
    register_module_rule,
    scoped,
    table,
    unregister,
)
from .bounds import layer_bound
from . import fuzzing
from . import activations, arithmetic, dropout, extrema, layers, normalizers, pooling, resampling, shape, torchvision  # noqa: F401  (entries)

__all__ = [
    "register", "unregister", "scoped", "lookup", "entries", "is_leaf", "table", "OpEntry", "OpTable",
    "FuzzCase", "NodeContext", "Step", "Unbounded", "constant", "unbounded", "layer_bound",
    "register_module_rule", "register_function_rule", "register_method_rule",
]
