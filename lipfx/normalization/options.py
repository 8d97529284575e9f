"""The settings every layer kind's normalization is built with."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from ..errors import ArgumentError
from .base import SCALINGS

POWER_ITERS = 2  # power steps per training step (warm-started: the weights move little per step)
# what convs and linear layers are held to (depthwise convs, and paddings that repeat pixels, stay "spectral")
CONSTRAINTS = ("spectral", "aol", "orthogonal")


@dataclass(frozen=True)
class NormOptions:
    """``scaling`` ('hard' or 'soft'), ``s_init`` (soft scaling's initial s), ``power_iters``
    (power steps per training step for pointwise/linear layers and full convs) and ``constraint``
    (one of :data:`CONSTRAINTS`); see :func:`lipfx.normalize`."""

    scaling: str = "hard"
    s_init: float = 3.0
    power_iters: int = POWER_ITERS
    constraint: str = "spectral"

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ArgumentError(f"unknown scaling {self.scaling!r}; choose from {SCALINGS}")
        if self.constraint not in CONSTRAINTS:
            raise ArgumentError(f"unknown constraint {self.constraint!r}; choose from {CONSTRAINTS}")
        check_power_iters(self.power_iters)


def check_power_iters(power_iters: object, name: str = "") -> int:
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
        where = f" for '{name}'" if name else ""
        raise ArgumentError(f"power_iters{where} must be a positive int, got {power_iters!r}")
    return power_iters


def warn_retired(eps: Optional[float], refresh: Optional[float], who: str, stacklevel: int = 3) -> None:
    """``eps`` and ``refresh`` steered host-side decisions (a residual stop, a drift test) that
    training no longer makes: accepted, ignored, and warned about."""
    if eps is not None:
        warnings.warn(f"{who}(eps=...) is ignored: a training step runs a fixed number of power steps "
                      "(power_iters=...), so that it never waits for the device; the last residual is in "
                      "lipfx.normalization.power_residuals(model)", DeprecationWarning, stacklevel=stacklevel)
    if refresh is not None:
        warnings.warn(f"{who}(refresh=...) is ignored: spatial convs are bounded over the whole spectrum at "
                      "every training step", DeprecationWarning, stacklevel=stacklevel)
