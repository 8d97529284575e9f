"""Invertible residual blocks (i-ResNet, Behrmann et al. 2019) with a certified contraction.

``y = x + g(x)`` is invertible when Lip(g) < 1 (docs/math.md, section 10). :class:`InvertibleResidual` converts
and normalizes ``g`` with a global budget (``lipfx.convert(..., lipschitz=coeff)``), so the
chain rule with every layer at its constant stays <= coeff whatever training does to the weights;
the constant it uses for inverses and error bounds is the *certificate* of g at its current
weights (never above coeff), not a power-iteration estimate. Without ``example_inputs`` it is
certified at every input size (``certified_at == "every input size"``).

- :meth:`InvertibleResidual.inverse` / :meth:`~InvertibleResidual.inverse_with_info`: Banach
  fixed-point iteration with an a-priori iteration count, an a-posteriori stop, and a final error
  bound from the residual in float64 (:mod:`.fixed_point`, :mod:`.residual`).
- :meth:`InvertibleResidual.logdet`: log|det(I + J_g(x))| by the power series with Hutchinson's
  trace estimator (truncated, or Russian roulette as in Residual Flows, Chen et al. 2019, with the
  Neumann-series gradient), or exactly for small inputs (:mod:`.logdet`).
- :class:`Squeeze` (space-to-depth, norm 1, exact inverse; :mod:`.squeeze`) and
  :class:`InvertibleSequential` (:mod:`.sequential`).
"""

from .fixed_point import InverseResult
from .logdet import LOGDET_METHODS
from .residual import EVERY_SIZE, InvertibleResidual
from .sequential import InvertibleSequential
from .squeeze import Squeeze

__all__ = ["InvertibleResidual", "InvertibleSequential", "Squeeze", "InverseResult", "LOGDET_METHODS", "EVERY_SIZE"]
