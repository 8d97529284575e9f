"""Gradient-norm-preserving (GNP) activations: 1-Lipschitz, with a Jacobian that is orthogonal
almost everywhere (docs/math.md, section 14).

ReLU halves the gradient's norm wherever it is off, so a network of norm-1 layers uses little of
its Lipschitz budget; these keep every singular value of the Jacobian at 1 (Anil et al. 2019,
GroupSort; Singla et al. and LipNeXt use MaxMin and Abs). ``lipfx.convert(..., activation=...)``
puts them in place of ReLU-like activations.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ArgumentError


class MaxMin(nn.Module):
    """Channels split in halves a, b along ``dim``: (max(a, b), min(a, b)). An odd last channel
    passes through. Piecewise a permutation of the entries, continuous: 1-Lipschitz, GNP."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[self.dim] // 2
        a, b = x.narrow(self.dim, 0, half), x.narrow(self.dim, half, half)
        rest = x.narrow(self.dim, 2 * half, x.shape[self.dim] - 2 * half)
        return torch.cat((torch.maximum(a, b), torch.minimum(a, b), rest), self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class GroupSort(nn.Module):
    """Consecutive groups of ``group_size`` entries along ``dim`` sorted in descending order (a
    remainder passes through). ``group_size=2`` is MaxMin on adjacent pairs."""

    def __init__(self, group_size: int = 2, dim: int = 1) -> None:
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ArgumentError(f"GroupSort group_size must be an int >= 2, got {group_size!r}")
        self.group_size, self.dim = group_size, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        n = x.shape[dim]
        full = n - n % self.group_size
        head = x.narrow(dim, 0, full)
        shape = head.shape[:dim] + (full // self.group_size, self.group_size) + head.shape[dim + 1:]
        ordered = head.reshape(shape).sort(dim + 1, descending=True).values.reshape(head.shape)
        return torch.cat((ordered, x.narrow(dim, full, n - full)), dim)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


class Abs(nn.Module):
    """|x|: 1-Lipschitz, its Jacobian a diagonal of signs (GNP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


GNP_ACTIVATIONS = {"maxmin": MaxMin, "groupsort": GroupSort, "abs": Abs}
