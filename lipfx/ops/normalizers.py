"""Entries for normalisation layers that divide by statistics of their own input (LayerNorm,
GroupNorm, RMSNorm, local response norm, ``F.normalize``). Eval-mode BatchNorm is a fixed affine
map and lives with the weighted layers (:mod:`lipfx.ops.layers`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .context import unbounded
from .layers import STATISTICS_REASON
from .table import OpEntry, table

_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_FUNCTIONS = (F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm, F.normalize) + (
    (F.rms_norm,) if hasattr(F, "rms_norm") else ())

ENTRIES = (
    OpEntry(_MODULES + _FUNCTIONS, unbounded(STATISTICS_REASON), lambda key, g: [],
            doc="unbounded (no finite claim to fuzz)"),
)
for _entry in ENTRIES:
    table().add(_entry)
