"""Whole-network Lipschitz certificates (docs/math.md, section 8).

Public API:
- :func:`certificate` -> :class:`Certificate` (bound, per-node records, ``unbounded``,
  ``critical_path()``, ``to_json()``);
- the per-op rules live in the op table (:mod:`lipfx.ops`); :func:`register_module_rule`,
  :func:`register_function_rule` and :func:`register_method_rule` are its decorator forms
  (a rule returns a :class:`Step` or raises :class:`Unbounded`).
"""

from ..ops.context import NodeContext, Step, Unbounded
from ..ops.table import register_function_rule, register_method_rule, register_module_rule
from .certificate import certificate
from .records import Certificate, Culprit, NodeRecord

__all__ = [
    "certificate",
    "Certificate",
    "NodeRecord",
    "Culprit",
    "NodeContext",
    "Step",
    "Unbounded",
    "register_module_rule",
    "register_function_rule",
    "register_method_rule",
]
