"""Whole-network Lipschitz certificates (MATH section 8).

Public API:
- :func:`certificate` -> :class:`Certificate` (bound, per-node records, ``unbounded``,
  ``critical_path()``, ``to_json()``);
- :func:`register_module_rule`, :func:`register_function_rule`, :func:`register_method_rule`
  to teach it new ops (a rule returns a :class:`Step` or raises :class:`Unbounded`).
"""

from .certificate import Certificate, Culprit, NodeRecord, certificate
from .registry import NodeContext, Step, Unbounded, register_function_rule, register_method_rule, register_module_rule

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
