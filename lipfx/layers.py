"""Small modules that the conversion passes insert. Each one is an ordinary nn.Module."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
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


class L2Pool(nn.Module):
    """Global l2 pooling: ``y[b, c] = ||x[b, c, ...]||_2`` over every dim after the first two,
    kept as size-1 dims (like ``AdaptiveAvgPool2d(1)``) unless ``keepdim=False``.

    1-Lipschitz (the reverse triangle inequality per channel) and norm-preserving,
    ``||y|| = ||x||``, where average pooling scales by ``1/sqrt(H W)`` (docs/math.md, 15).
    """

    def __init__(self, keepdim: bool = True) -> None:
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"L2Pool needs (batch, channels, *spatial) inputs, got shape {tuple(x.shape)}")
        return torch.linalg.vector_norm(x, 2, dim=tuple(range(2, x.dim())), keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return "" if self.keepdim else "keepdim=False"


class Shift(nn.Module):
    """Parameter-free spatial mixing: output channel c is input channel c moved by one kernel
    offset (zero fill), i.e. a depthwise conv whose kernel is one-hot (LipNeXt's spatial shifts).

    Channel c takes kernel position ``order[c % k]`` of the ``k = prod(kernel_size)`` positions,
    the centre first, so the channels are spread evenly over every offset the replaced conv could
    reach. Each output reads at most one input and no input feeds two outputs: norm <= 1, with
    equality unless the offset leaves the image; for stride 1 it is an isometry away from the
    border. Keeps the replaced conv's stride, padding, dilation and bias.
    """

    def __init__(self, channels: int, kernel_size: Sequence[int], stride: Optional[Sequence[int]] = None,
                 padding: Optional[Sequence[int]] = None, dilation: Optional[Sequence[int]] = None,
                 bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = tuple(kernel_size)
        ndim = len(self.kernel_size)
        if ndim not in (1, 2, 3):
            raise ValueError(f"Shift supports 1-, 2- and 3-D kernels, got kernel_size={kernel_size}")
        self.stride = tuple(stride) if stride is not None else (1,) * ndim
        self.padding = tuple(padding) if padding is not None else (0,) * ndim
        self.dilation = tuple(dilation) if dilation is not None else (1,) * ndim
        positions = math.prod(self.kernel_size)
        centre = sum(((k - 1) // 2) * math.prod(self.kernel_size[i + 1:]) for i, k in enumerate(self.kernel_size))
        order = [centre] + [p for p in range(positions) if p != centre]
        onehot = torch.zeros(channels, positions)
        onehot[torch.arange(channels), torch.tensor([order[c % positions] for c in range(channels)])] = 1.0
        self.register_buffer("weight", onehot.reshape(channels, 1, *self.kernel_size))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return conv(x, self.weight.to(x.dtype), bias, self.stride, self.padding, self.dilation, self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
