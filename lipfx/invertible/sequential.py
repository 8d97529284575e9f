"""A chain of invertible blocks: inverse block by block with the errors' amplification bounded."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from .fixed_point import InverseResult, missed, norm, warn_return_info


class InvertibleSequential(nn.Sequential):
    """A chain of :class:`InvertibleResidual` and :class:`Squeeze` (or any module with
    ``inverse``, ``forward_and_logdet``, ``lipschitz`` and ``inverse_lipschitz``; one with
    ``inverse_with_info`` too is inverted through it, otherwise by ``inverse(..., return_info=True)``)."""

    _PROTOCOL = ("inverse", "forward_and_logdet", "lipschitz", "inverse_lipschitz")

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__(*modules)
        for i, m in enumerate(self):
            missing = [a for a in self._PROTOCOL if not callable(getattr(m, a, None))]
            if missing:
                raise TypeError(f"InvertibleSequential: module {i} ({type(m).__name__}) lacks {', '.join(missing)}")

    def forward_and_logdet(self, x: torch.Tensor, method: str = "series", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, sum of the blocks' logdets)``; options as :meth:`InvertibleResidual.forward_and_logdet`."""
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for m in self:
            x, ld = m.forward_and_logdet(x, method, **kwargs)
            total = total + ld
        return x, total

    def logdet(self, x: torch.Tensor, method: str = "series", **kwargs) -> torch.Tensor:
        return self.forward_and_logdet(x, method, **kwargs)[1]

    def lipschitz(self) -> float:
        return math.prod(m.lipschitz() for m in self)

    def inverse_lipschitz(self) -> float:
        return math.prod(m.inverse_lipschitz() for m in self)

    @torch.no_grad()
    def inverse(self, y: torch.Tensor, tol: float = 1e-6, max_iter: Optional[int] = None, *,
                dtype: Optional[torch.dtype] = torch.float64, return_info: bool = False, strict: bool = False):
        """x, inverted block by block (see :meth:`inverse_with_info`, which also returns the
        error bound). ``return_info=True`` is deprecated: it returns that method's result."""
        if return_info:
            warn_return_info("InvertibleSequential")
        info = self._solve(y, tol, max_iter, dtype, strict)
        return info if return_info else info.x

    @torch.no_grad()
    def inverse_with_info(self, y: torch.Tensor, tol: float = 1e-6, max_iter: Optional[int] = None, *,
                          dtype: Optional[torch.dtype] = torch.float64, strict: bool = False) -> InverseResult:
        """Invert block by block, last first, and return x in ``y``'s dtype, as an
        :class:`InverseResult` (per sample: total iterations, certified error bound, converged).

        An error e in a later block's inverse reaches x amplified by the earlier inverses'
        constants (up to prod 1/(1 - c_j): 1e7 for seven blocks at c = 0.9), so block k gets the
        tolerance tol / (n * prod_{j<k} Lip(inverse_j)), and the intermediates are computed in
        float64 (``dtype``; None keeps ``y``'s dtype) where float32 could not meet such
        tolerances. The returned bound is sum_k bound_k * prod_{j<k} Lip(inverse_j), plus the
        rounding of x to ``y``'s dtype. A sample that misses ``tol`` warns, or raises
        LipfxError with ``strict=True``.
        """
        return self._solve(y, tol, max_iter, dtype, strict)

    def _solve(self, y: torch.Tensor, tol: float, max_iter: Optional[int], dtype: Optional[torch.dtype],
               strict: bool) -> InverseResult:
        blocks = list(self)
        amplify = [1.0]
        for m in blocks[:-1]:
            amplify.append(amplify[-1] * m.inverse_lipschitz())
        total = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
        iterations = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
        x = y if dtype is None else y.to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # judged on the total below
            for m, a in zip(reversed(blocks), reversed(amplify)):
                block_tol = tol / (len(blocks) * a)
                if callable(getattr(m, "inverse_with_info", None)):
                    info = m.inverse_with_info(x, block_tol, max_iter, dtype=x.dtype)
                else:  # the older protocol
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        info = m.inverse(x, block_tol, max_iter, dtype=x.dtype, return_info=True)
                x = info.x
                total = total + info.error_bound * a
                iterations = iterations + info.iterations
        out = x.to(y.dtype)
        total = total + norm(out.double() - x.double())
        converged = total <= tol
        if not bool(converged.all()):
            # warn at the caller's line: past missed, _solve, inverse(_with_info) and no_grad's wrapper
            missed("InvertibleSequential", converged, total, tol, strict,
                   f"the inverse's Lipschitz bound is {self.inverse_lipschitz():.3g}", stacklevel=5)
        return InverseResult(out, iterations, total, converged)
