"""Give a classifier's last linear layer unit-norm rows (``convert(..., last_layer="unit-rows")``).

The layer is found from the graph: the module the output node returns must be an ``nn.Linear``.
It gets the :class:`lipfx.normalization.rows.UnitRows` parametrization and is left out of the
K normalization (its pairwise constants, not its operator norm, are what radii use).
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ArgumentError, LipfxError
from ..normalization.rows import UnitRows
from .report import ConversionReport

LAST_LAYERS = ("unit-rows",)


def final_linear_name(gm: fx.GraphModule) -> str:
    """The name of the ``nn.Linear`` whose output ``gm`` returns; a LipfxError naming what the
    output is otherwise."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    if isinstance(value, fx.Node) and value.op == "call_module" and isinstance(gm.get_submodule(value.target), nn.Linear):
        return str(value.target)
    what = value.format_node() if isinstance(value, fx.Node) else repr(value)
    raise LipfxError(f"last_layer: the network must return the output of an nn.Linear module; it returns {what}")


def normalize_last_layer(gm: fx.GraphModule, mode: str, report: Optional[ConversionReport] = None) -> str:
    """Register ``mode``'s parametrization on ``gm``'s final linear layer, in place; returns its name."""
    if mode not in LAST_LAYERS:
        raise ArgumentError(f"unknown last_layer {mode!r}; choose from {LAST_LAYERS} or None")
    name = final_linear_name(gm)
    layer = gm.get_submodule(name)
    if parametrize.is_parametrized(layer, "weight"):
        raise LipfxError(f"last_layer: '{name}' is already parametrized")
    parametrize.register_parametrization(layer, "weight", UnitRows())
    if report is not None:
        report.add(name, "unit-rows", "rows of norm 1; left out of the K normalization")
    return name
