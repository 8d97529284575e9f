"""Unit-norm rows for a network's last linear layer (``convert(..., last_layer="unit-rows")``).

With rows w_i of norm 1, the logit differences f_i - f_j have constant L_phi ||w_i - w_j|| <= 2 L_phi
(L_phi: the features' bound), which :func:`lipfx.robust.certified_radius` uses pair by pair;
the layer's own operator norm (up to sqrt(classes)) is what the whole-network certificate sees.
"""

from __future__ import annotations

import torch
from torch import nn


class UnitRows(nn.Module):
    """Parametrization ``W -> W_i / ||W_i||`` for every row i (a zero row stays zero)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(weight.flatten(1), dim=1)
        norms = norms.clamp_min(torch.finfo(weight.dtype).tiny).reshape((-1,) + (1,) * (weight.dim() - 1))
        return weight / norms
