"""The settings every layer kind's normalization is built with."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ArgumentError
from .base import SCALINGS


@dataclass(frozen=True)
class NormOptions:
    """``scaling`` ('hard' or 'soft'), ``s_init`` (soft scaling's initial s), ``eps`` (relative
    stopping tolerance of the power iteration) and ``refresh`` (relative kernel drift after which a
    spatial conv's FFT bound is searched again); see :func:`lipfx.normalize`."""

    scaling: str = "hard"
    s_init: float = 3.0
    eps: float = 0.01
    refresh: float = 1e-3

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ArgumentError(f"unknown scaling {self.scaling!r}; choose from {SCALINGS}")
        if not 0 < self.eps < 1:
            raise ArgumentError(f"eps must be in (0, 1), got {self.eps}")
        if not self.refresh >= 0:
            raise ArgumentError(f"refresh must be >= 0, got {self.refresh}")
