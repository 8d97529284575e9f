"""Gradient-norm-preserving weights for pointwise (1x1) convs and linear layers (docs/math.md, 15).

- :class:`AOLNormalization`: ``W -> K * W D`` with ``D = diag(sum_j |W^T W|_ij)^(-1/2)``
  (almost-orthogonal layers, Prach & Lampert 2022): ``||W D|| <= 1`` for every W, no state.
- :class:`OrthogonalNormalization`: ``W -> K * Q``, Q (semi-)orthogonal for every value of the
  trained parameter: ``Q = B cayley(A)`` (first columns), A skew-symmetric built from the
  parameter and B an orthogonal buffer, set at registration to the completed polar factor of the
  layer's weight (so the layer starts at its nearest (semi-)orthogonal matrix, parameter 0).

Both are differentiable maps computed on every training forward, with no host read; in eval mode
the base class divides by the *certified* norm of the mapped weight where it exceeds 1 (float
round-off), so each layer's norm is <= K exactly there and the eval network is the trained one.
Iterative orthogonalization (Björck steps after AOL) was measured and dropped: under Adam the raw
weight drifts until a fixed number of steps no longer converges (max |sigma - 1| = 0.95 after 100
steps at lr 1e-2, docs/benchmarks.md); the Cayley map is orthogonal whatever the parameter is.
"""

from __future__ import annotations

import math

import torch

from ..norms.conv import grouped_matrix_norm
from .base import LipschitzNormalization, _autocast_off, compute_dtype, exact_map_dtype
from .rescale import TrainBound


def aol_rescale(w: torch.Tensor) -> torch.Tensor:
    """AOL for a batch of matrices (..., m, n), on the side of the smaller Gram matrix:
    ``W D`` with ``D_jj = (sum_i |W^T W|_ji)^(-1/2)`` when m >= n, ``D W`` with ``D`` from
    ``W W^T`` when m < n. Either way ``||.|| <= 1`` (Schur's test on D W^T W D, resp. D W W^T D),
    and a (semi-)orthogonal W is left as it is. A zero column (row) stays zero.
    """
    tall = w.shape[-2] >= w.shape[-1]
    gram = w.mT @ w if tall else w @ w.mT
    d = gram.abs().sum(-1).clamp_min(torch.finfo(w.dtype).tiny).rsqrt()
    return w * d.unsqueeze(-2) if tall else w * d.unsqueeze(-1)


def cayley(a: torch.Tensor) -> torch.Tensor:
    """``(I + A)^-1 (I - A)`` for skew-symmetric A (batched): orthogonal, I + A is never singular."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    # solve_ex: linalg.solve's singularity check would read a flag on the host (a GPU wait),
    # and I + A, with A skew, has eigenvalues 1 + i t: never singular
    return torch.linalg.solve_ex(eye + a, eye - a)[0]


def bjorck_step(x: torch.Tensor) -> torch.Tensor:
    """One Björck step ``1.5 X - 0.5 X X^T X`` (through the smaller Gram matrix G): singular
    values follow s -> 1.5 s - 0.5 s^3, which maps [0, sqrt(3)] into [0, 1] (1 + e to
    1 - 1.5 e^2 - 0.5 e^3). G's largest absolute row sum r bounds ``||X||^2``; where r > 3 X is
    first scaled by sqrt(3 / r). A near-orthogonal X is left as it is; a solve far off (huge
    parameters make I + A ill-conditioned) ends below 1, where unscaled its singular values
    above sqrt(3) would come out larger than they went in."""
    tall = x.shape[-2] >= x.shape[-1]
    gram = x.mT @ x if tall else x @ x.mT
    shrink = (3.0 / gram.abs().sum(-1).amax(-1).clamp_min(3.0))[..., None, None]  # 1 unless r > 3
    x = x * shrink.sqrt()
    gram = gram * shrink
    return 1.5 * x - 0.5 * (x @ gram if tall else gram @ x)


def skew_from_columns(x: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric (..., m, m) matrix whose strictly lower part, in the first n columns,
    is that of x (..., m, n), m >= n: ``nm - n(n+1)/2`` free entries, the Stiefel manifold's dimension."""
    m, n = x.shape[-2:]
    low = torch.nn.functional.pad(x, (0, m - n)).tril(-1)
    return low - low.mT


def stiefel(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (semi-)orthogonal matrix of x's shape (..., m, n) that x parametrizes around ``base``
    (..., max(m, n), max(m, n)), orthogonal: the first columns of ``base @ cayley(A(x))``,
    transposed for a wide x; x = 0 gives base's first columns."""
    tall = x if x.shape[-2] >= x.shape[-1] else x.mT
    n = tall.shape[-1]
    q = (base.to(tall.dtype) @ cayley(skew_from_columns(tall)))[..., :n]
    # the float32 solve is orthogonal only to ~1e-3 for large or badly conditioned I + A (O(1)
    # off for entries ~1e7); one Björck step brings it back within ~1e-6, never above 1. The
    # step is taken outside autograd and its gradient is the identity's: at a (semi-)orthogonal
    # Q the step's derivative is the identity on the tangent space, where the Cayley map's
    # derivative lies (docs/math.md, 15.2), so this is the exact gradient up to Q's rounding,
    # for a third of the operations.
    with torch.no_grad():
        fixed = bjorck_step(q)
    q = fixed + (q - q.detach())  # fixed's value exactly (q - q is 0), q's gradient
    return q if x.shape[-2] >= x.shape[-1] else q.mT


def polar_factor(w: torch.Tensor) -> torch.Tensor:
    """U V^T of a batch of matrices: the nearest (semi-)orthogonal matrix in Frobenius norm."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u @ vh).to(w.dtype)


def completed_polar(x: torch.Tensor) -> torch.Tensor:
    """An orthogonal (..., m, m) matrix whose first n columns are the polar factor of x (..., m, n)."""
    q = polar_factor(x.double())
    m, n = x.shape[-2:]
    if m == n:
        return q
    g = torch.Generator().manual_seed(0)
    rest = torch.randn(*x.shape[:-1], m - n, generator=g, dtype=torch.float64).to(q.device)
    full, _ = torch.linalg.qr(torch.cat((q, rest), -1))
    # QR keeps the span of the first n columns but may flip their signs: put U V^T back exactly
    return torch.cat((q, full[..., n:]), -1)


class AOLNormalization(LipschitzNormalization):
    """Pointwise convs and linear layers (per group): ``W -> K * W D`` (almost orthogonal).

    ``initialize``: replace ``weight``'s values by their polar factor (per group) first.
    """

    kind = "aol"
    bounded_by_construction = True

    def __init__(self, weight: torch.Tensor, groups: int, K: float, scaling: str = "hard",
                 s_init: float = 3.0, name: str = "", initialize: bool = True) -> None:
        super().__init__(K, scaling, s_init, name)
        self.groups = groups
        if initialize:
            self.initialize(weight)

    def _matrices(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.groups, weight.shape[0] // self.groups, -1)

    def _gnp(self, x: torch.Tensor) -> torch.Tensor:
        return aol_rescale(x)

    def transform(self, weight: torch.Tensor) -> torch.Tensor:
        # never under autocast: eval mode bounds this map's output once and applies it again
        # later, so both evaluations must give the same values whatever autocast says then
        with _autocast_off(weight.device.type):
            x = self._matrices(weight.to(exact_map_dtype(weight)))
            return self._gnp(x).reshape(weight.shape).to(weight.dtype)

    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        # the transformed weight has norm <= 1 by construction: nothing to bound, nothing to read
        return TrainBound(torch.ones((), dtype=compute_dtype(weight), device=weight.device), None)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """Set the raw weight to its polar factor, which AOL leaves as it is."""
        weight.copy_(polar_factor(self._matrices(weight)).reshape(weight.shape))

    def exact_bound(self, weight: torch.Tensor) -> float:
        return grouped_matrix_norm(weight.reshape(weight.shape[0], -1), self.groups)

    def rounding_terms(self, weight: torch.Tensor) -> float:
        rows, cols = weight.shape[0] // self.groups, weight[0].numel()
        return math.sqrt(min(rows, cols))


class OrthogonalNormalization(AOLNormalization):
    """Pointwise convs and linear layers (per group): ``W -> K * Q`` with Q (semi-)orthogonal:
    the first columns of ``B cayley(A(W))`` (transposed for a wide W), B an orthogonal buffer.

    At registration B becomes the completed polar factor of ``weight`` and ``weight`` becomes 0,
    the parameter of that matrix (``weight`` is modified in place)."""

    kind = "orthogonal(cayley)"

    def __init__(self, weight: torch.Tensor, groups: int, K: float, scaling: str = "hard",
                 s_init: float = 3.0, name: str = "") -> None:
        super().__init__(weight, groups, K, scaling, s_init, name, initialize=False)
        x = self._tall(self._matrices(weight.detach()))
        base = completed_polar(x).to(compute_dtype(weight))
        self.register_buffer("base", base)
        with torch.no_grad():
            weight.zero_()

    def transform_state(self) -> tuple:
        return (self.base,)

    def _tall(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-2] >= x.shape[-1] else x.mT

    def _gnp(self, x: torch.Tensor) -> torch.Tensor:
        return stiefel(self.base, x)

    def _apply(self, fn, recurse=True):
        return keep_wide(self, ("base",), lambda: super(OrthogonalNormalization, self)._apply(fn, recurse))


def keep_wide(module: torch.nn.Module, names: tuple, apply) -> torch.nn.Module:
    """``module._apply`` (run by ``apply()``) that moves and casts like any module's, except that
    the orthogonal buffers ``names`` never drop below float32: rounded to float16 they would be
    orthogonal only to about 1e-3."""
    before = {n: module._buffers[n] for n in names}
    out = apply()
    for n, old in before.items():
        after = module._buffers[n]
        wide = torch.promote_types(after.dtype, torch.float32)
        if after.dtype != wide:
            module._buffers[n] = old.to(device=after.device, dtype=torch.promote_types(old.dtype, wide))
    return out
