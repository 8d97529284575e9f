"""Small modules that the conversion passes insert. Each one is an ordinary nn.Module."""

from __future__ import annotations

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """y = scale * x + shift per channel (dim 1): an eval-mode BatchNorm that could not be folded.

    Its Lipschitz constant is max |scale|.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


class SeparableConv(nn.Module):
    """A convolution rewritten as ``pointwise(depthwise(x))`` with no activation between.

    ``depthwise``: groups = in_channels, channel multiplier ``rank``, carrying the stride, padding,
    dilation and padding mode; ``pointwise``: 1x1 (grouped like the original), carrying the bias.
    """

    def __init__(self, depthwise: nn.Module, pointwise: nn.Module, rank: int) -> None:
        super().__init__()
        self.depthwise = depthwise
        self.pointwise = pointwise
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
