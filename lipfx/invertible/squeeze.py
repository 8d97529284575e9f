"""Space-to-depth for invertible networks, and its certificate rule."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import FuzzCase, constant, register
from ..ops.fuzzing import randn
from ..errors import ArgumentError, ShapeError
from .fixed_point import InverseResult, warn_return_info


class Squeeze(nn.Module):
    """Space-to-depth: (N, C, s1, ..., sd) -> (N, C f^d, s1/f, ..., sd/f). A permutation of the
    entries: norm 1, logdet 0, exact inverse (:class:`torch.nn.PixelUnshuffle` order in 2-D)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ArgumentError(f"factor must be >= 1, got {factor}")
        self.factor = int(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *sizes = x.shape
        f = self.factor
        if any(s % f for s in sizes):
            raise ShapeError(f"Squeeze(factor={f}): spatial sizes {tuple(sizes)} are not divisible by {f}")
        d = len(sizes)
        split = [n, c] + [q for s in sizes for q in (s // f, f)]
        order = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
        return x.reshape(split).permute(order).reshape(n, c * f ** d, *(s // f for s in sizes))

    def inverse(self, y: torch.Tensor, tol: float = 0.0, max_iter: Optional[int] = None, *,
                dtype: Optional[torch.dtype] = None, return_info: bool = False, strict: bool = False):
        """The exact inverse (``tol``, ``max_iter`` and ``strict`` are accepted for the protocol
        of :class:`InvertibleSequential`). ``return_info=True`` is deprecated: use
        :meth:`inverse_with_info`."""
        if return_info:
            warn_return_info("Squeeze")
            return self.inverse_with_info(y, tol, max_iter, dtype=dtype, strict=strict)
        return self._unsqueeze(y if dtype is None else y.to(dtype))

    def inverse_with_info(self, y: torch.Tensor, tol: float = 0.0, max_iter: Optional[int] = None, *,
                          dtype: Optional[torch.dtype] = None, strict: bool = False) -> InverseResult:
        """The exact inverse as an :class:`InverseResult` (0 iterations, error bound 0)."""
        x = self._unsqueeze(y if dtype is None else y.to(dtype))
        n = y.shape[0]
        zeros = torch.zeros(n, dtype=torch.float64, device=y.device)
        return InverseResult(x, torch.zeros(n, dtype=torch.long, device=y.device), zeros, zeros <= tol)

    def _unsqueeze(self, y: torch.Tensor) -> torch.Tensor:
        n, cf, *sizes = y.shape
        f, d = self.factor, len(sizes)
        if cf % f ** d:
            raise ShapeError(f"Squeeze(factor={f}).inverse: {cf} channels are not divisible by {f ** d}")
        c = cf // f ** d
        x = y.reshape([n, c] + [f] * d + sizes)
        order = [0, 1] + [q for i in range(d) for q in (2 + d + i, 2 + i)]
        return x.permute(order).reshape(n, c, *(s * f for s in sizes))

    def forward_and_logdet(self, x: torch.Tensor, method: str = "series", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def logdet(self, x: torch.Tensor, method: str = "series", **kwargs) -> torch.Tensor:
        return self.forward_and_logdet(x)[1]

    def lipschitz(self) -> float:
        return 1.0

    def inverse_lipschitz(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _squeeze_cases(key: type, g: torch.Generator) -> list[FuzzCase]:
    return [FuzzCase(Squeeze(f), (randn(shape, g),), f"factor {f}, {shape}")
            for f, shape in ((2, (2, 3, 4, 6)), (3, (1, 2, 6)), (2, (1, 1, 2, 4, 2)))]


# a leaf (its reshapes depend on the input shape, which fx cannot trace) with its own entry
register(Squeeze, rule=constant(1.0, "space-to-depth: a permutation"), fuzz=_squeeze_cases, leaf=True)
