"""The Banach fixed-point inverse's pieces: its result type, stopping rules and error reports."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import nn

from ..errors import LipfxError


class InverseResult(NamedTuple):
    """What ``inverse_with_info`` returns (per sample)."""

    x: torch.Tensor
    iterations: torch.Tensor  # fixed-point steps taken
    error_bound: torch.Tensor  # certified ||x - x*|| (float64), x* the exact preimage
    converged: torch.Tensor  # error_bound <= tol


def warn_return_info(who: str) -> None:
    """``inverse(..., return_info=True)`` is deprecated: it returns a tuple instead of a tensor."""
    warnings.warn(f"{who}.inverse(..., return_info=True) is deprecated: call {who}.inverse_with_info(...), "
                  "which always returns an InverseResult", DeprecationWarning, stacklevel=3)


def missed(who: str, converged: torch.Tensor, bound: torch.Tensor, tol: float, strict: bool, detail: str,
           stacklevel: int = 4) -> None:
    """Samples whose certified error exceeds tol: raise (strict), or warn at the line that called
    ``inverse`` (past ``inverse`` and its torch.no_grad wrapper)."""
    msg = (f"{who}.inverse: {int((~converged).sum())} of {converged.numel()} samples missed tol={tol:g} "
           f"(worst certified error {float(bound.max()):.3g}; {detail})")
    if strict:
        raise LipfxError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


def norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norm over all non-batch dims, in float64."""
    return t.double().flatten(1).norm(dim=1)


def stop(step: torch.Tensor, rho: torch.Tensor, c: float, tol: float) -> torch.Tensor:
    """A-posteriori test (c ||x_k - x_{k-1}|| + rho) / (1 - c) <= tol, or stagnation: steps as
    small as the round-off, where more iterations cannot help (the final check then decides)."""
    return ((c * step + rho) / (1 - c) <= tol) | (step <= 2 * rho)


def apriori(first_step: torch.Tensor, c: float, tol: float) -> torch.Tensor:
    """Banach: iterations k with c^k / (1 - c) ||x_1 - x_0|| <= tol (at least 1)."""
    if c == 0:
        return torch.ones_like(first_step, dtype=torch.long)
    need = torch.log(tol * (1 - c) / first_step.clamp_min(1e-300)) / math.log(c)
    return need.ceil().clamp(min=1).long()


def module_dtype(module: nn.Module) -> torch.dtype:
    return next((t.dtype for t in module.parameters() if t.is_floating_point()), torch.get_default_dtype())


def module_device(module: nn.Module) -> torch.device:
    return next((t.device for t in module.parameters()), torch.device("cpu"))
