"""Normalised geometry of a convolution: the facts every bound needs, resolved once.

torch stores padding as ints, tuples or the strings 'same'/'valid', and applies non-zero padding
modes through ``F.pad``. Here everything becomes explicit per-dimension (low, high) pad pairs, so
the bounds never have to re-derive torch's conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ArgumentError, ShapeError, UnsupportedModuleError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PADDING_MODES = ("zeros", "circular", "reflect", "replicate")


def describe(module: nn.Module, name: Optional[str] = None) -> str:
    """A short label for error messages: ``'layer1.0.conv1' (Conv2d(64, 64, ...))``."""
    text = repr(module).split("\n")[0]
    return f"'{name}' ({text})" if name else text


@dataclass(frozen=True)
class ConvGeometry:
    """Geometry of a zero-/circular-/reflect-/replicate-padded N-d convolution."""

    weight: torch.Tensor  # (Cout, Cin/groups, *kernel)
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]  # (low, high) per spatial dim
    padding_mode: str

    @property
    def ndim(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def effective_kernel(self) -> tuple[int, ...]:
        """Extent of the dilated kernel per dim: d*(k-1)+1."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size))

    @property
    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel_size)

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group (channel multiplier = Cout / Cin)."""
        return self.weight.shape[1] == 1

    def output_size(self, n: Sequence[int]) -> tuple[int, ...]:
        return tuple(
            (ni + lo + hi - ke) // s + 1
            for ni, (lo, hi), ke, s in zip(n, self.pads, self.effective_kernel, self.stride)
        )

    def dilated_weight(self) -> torch.Tensor:
        """The kernel with (dilation - 1) zeros inserted between taps."""
        if all(d == 1 for d in self.dilation):
            return self.weight
        shape = self.weight.shape[:2] + self.effective_kernel
        out = self.weight.new_zeros(shape)
        index = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in self.dilation)
        out[index] = self.weight
        return out

    def check_input(self, n: Sequence[int], label: str) -> None:
        """Raise ShapeError unless spatial size ``n`` is a valid input for this conv."""
        if len(n) != self.ndim:
            raise ShapeError(f"{label}: expects {self.ndim} spatial dims, got input size {tuple(n)}")
        for dim, (ni, (lo, hi), ke) in enumerate(zip(n, self.pads, self.effective_kernel)):
            if ni < 1:
                raise ShapeError(f"{label}: spatial size {ni} in dim {dim} is not positive")
            if ni + lo + hi < ke:
                raise ShapeError(
                    f"{label}: input size {ni} in dim {dim} plus padding ({lo}, {hi}) is smaller "
                    f"than the (dilated) kernel extent {ke}"
                )
            if self.padding_mode == "reflect" and max(lo, hi) >= ni:
                raise ShapeError(f"{label}: reflect padding {max(lo, hi)} needs input size > it in dim {dim}, got {ni}")
            if self.padding_mode == "circular" and max(lo, hi) > ni:
                raise ShapeError(f"{label}: circular padding {max(lo, hi)} exceeds input size {ni} in dim {dim}")


def _resolve_pads(conv: nn.Module, label: str) -> tuple[tuple[int, int], ...]:
    d = conv.weight.dim() - 2
    padding = conv.padding
    if padding == "valid":
        return tuple((0, 0) for _ in range(d))
    if padding == "same":
        # torch's convention (F.conv*, _ConvNd): total = dilation*(k-1), the extra one goes high.
        pads = []
        for dil, k in zip(conv.dilation, conv.kernel_size):
            total = dil * (k - 1)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        padding = (padding,) * d
    if len(padding) != d:
        raise UnsupportedModuleError(f"{label}: cannot read padding {padding!r}")
    return tuple((int(p), int(p)) for p in padding)


def conv_geometry(conv: nn.Module, name: Optional[str] = None) -> ConvGeometry:
    """Geometry of an ``nn.Conv1d/2d/3d`` (any stride, dilation, groups, padding mode)."""
    label = describe(conv, name)
    if not isinstance(conv, _CONV_TYPES):
        raise UnsupportedModuleError(f"{label}: not an nn.Conv1d/2d/3d")
    if conv.padding_mode not in PADDING_MODES:
        raise UnsupportedModuleError(f"{label}: unknown padding_mode {conv.padding_mode!r}")
    return ConvGeometry(
        weight=conv.weight.detach(),
        groups=conv.groups,
        stride=tuple(conv.stride),
        dilation=tuple(conv.dilation),
        pads=_resolve_pads(conv, label),
        padding_mode=conv.padding_mode,
    )


def padding_multiplicity(mode: str, n: int, lo: int, hi: int) -> int:
    """Most times one input element appears in the padded 1-D signal (``||pad||^2``).

    Non-zero padding copies input elements; the padding operator P is a 0/1 selection matrix, so
    P^T P is diagonal with these counts and ||P|| = sqrt(max count), exactly.
    """
    if mode == "zeros" or lo == hi == 0:
        return 1
    counts = [1] * n
    for j in range(-lo, 0):
        counts[_source_index(mode, j, n)] += 1
    for j in range(n, n + hi):
        counts[_source_index(mode, j, n)] += 1
    return max(counts)


def _source_index(mode: str, j: int, n: int) -> int:
    if mode == "circular":
        return j % n
    if mode == "replicate":
        return min(max(j, 0), n - 1)
    if mode == "reflect":
        period = 2 * (n - 1)
        j = j % period if period else 0
        return j if j < n else period - j
    raise ArgumentError(mode)


def max_padding_multiplicity(mode: str, lo: int, hi: int) -> int:
    """Upper bound of :func:`padding_multiplicity` over every input size torch accepts."""
    if mode == "zeros" or lo == hi == 0:
        return 1
    if mode == "replicate":  # n = 1: the single element fills both pads
        return 1 + lo + hi
    # reflect (pad < n) and circular (pad <= n): each side copies an element at most once.
    return 1 + (lo > 0) + (hi > 0)


def padding_norm(mode: str, n: Sequence[int] | None, pads: Sequence[tuple[int, int]]) -> float:
    """||P|| of the padding operator (product over dims; P is a Kronecker product)."""
    total = 1
    for dim, (lo, hi) in enumerate(pads):
        total *= (
            max_padding_multiplicity(mode, lo, hi) if n is None else padding_multiplicity(mode, n[dim], lo, hi)
        )
    return math.sqrt(total)
