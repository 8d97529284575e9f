"""Invertible residual blocks (i-ResNet, Behrmann et al. 2019) with a certified contraction.

``y = x + g(x)`` is invertible when Lip(g) < 1 (MATH 10). :class:`InvertibleResidual` converts
and normalizes ``g`` with a global budget (``lipfx.convert(..., lipschitz=coeff)``), so the
chain rule with every layer at its constant stays <= coeff whatever training does to the weights;
the constant it uses for inverses and error bounds is the *certificate* of g at its current
weights (never above coeff), not a power-iteration estimate.

- :meth:`InvertibleResidual.inverse`: Banach fixed-point iteration with an a-priori iteration
  count, an a-posteriori stop, and a final error bound from the residual in float64.
- :meth:`InvertibleResidual.logdet`: log|det(I + J_g(x))| by the power series with Hutchinson's
  trace estimator (truncated, or Russian roulette as in Residual Flows, Chen et al. 2019, with the
  Neumann-series gradient), or exactly for small inputs.
- :class:`Squeeze` (space-to-depth, norm 1, exact inverse) and :class:`InvertibleSequential`.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from .bake import bake
from .certify import Step, certificate, register_module_rule
from .convert import convert
from .errors import ArgumentError, LipfxError, ShapeError
from .tracing import Inputs, as_tuple, eval_mode, propagate_shapes

LOGDET_METHODS = ("series", "roulette", "exact")
_EXACT_MAX_DIM = 4096  # dense Jacobians beyond this are slow and memory-hungry: use an estimator


class InverseResult(NamedTuple):
    """What :meth:`InvertibleResidual.inverse` returns with ``return_info=True`` (per sample)."""

    x: torch.Tensor
    iterations: torch.Tensor  # fixed-point steps taken
    error_bound: torch.Tensor  # certified ||x - x*|| (float64), x* the exact preimage
    converged: torch.Tensor  # error_bound <= tol


class InvertibleResidual(nn.Module):
    """``y = x + g(x)`` with g converted and normalized so that its certificate is <= ``coeff``.

    Args:
        branch: the residual branch g (any torch.fx-traceable module; the original is not modified).
        coeff: the contraction to enforce, 0 < coeff < 1.
        example_inputs: one input (with batch dim) of the size the block will be used at; the
            FFT bounds of convolutions, and so the certificate, hold at that size, and
            :meth:`forward` refuses others.
        separable: rewrite convs into depthwise-separable pairs (``"exact"``, ``"fresh"``) or keep
            them whole (``None``, the default: one tight FFT bound per conv, so the certified
            contraction is close to ``coeff``; a separable pair's two factors bound it loosely).
        bn, scaling, eps, refresh, leaf_modules: as in :func:`lipfx.convert` (``refresh`` trades
            how close each layer stays to its constant in training for fewer full FFT searches).

    Raises LipfxError naming the culprit nodes when g has no finite certificate (LayerNorm,
    attention, products of activations, ...) or when fixed parts of g alone exceed ``coeff``.
    """

    def __init__(self, branch: nn.Module, coeff: float = 0.9, example_inputs: Optional[Inputs] = None, *,
                 separable: Optional[str] = None, bn: Optional[str] = "fold", scaling: str = "hard",
                 eps: float = 0.01, refresh: float = 1e-3, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__()
        if not 0 < coeff < 1:
            raise ArgumentError(f"coeff must be in (0, 1) for an invertible block, got {coeff}")
        if example_inputs is None:
            raise TypeError("InvertibleResidual needs example_inputs: the certificate of the branch holds at the "
                            "input size it is computed for")
        (x,) = as_tuple(example_inputs)
        try:
            self.branch: fx.GraphModule = convert(branch, x[:1], K=1.0, lipschitz=coeff, separable=separable, bn=bn,
                                                  scaling=scaling, eps=eps, refresh=refresh,
                                                  leaf_modules=leaf_modules)
        except LipfxError as exc:
            raise LipfxError(f"InvertibleResidual({type(branch).__name__}): cannot certify the branch below "
                             f"coeff={coeff}: {exc}") from exc
        self.coeff = float(coeff)
        self.input_shape = tuple(x.shape[1:])
        # the certified constant and a float64 plain copy of the branch, for the weights in _key;
        # a tuple, so the copy is not registered as a submodule (nor saved in the state_dict)
        self._key: Optional[tuple] = None
        self._cached: tuple[float, Optional[nn.Module]] = (math.nan, None)

    # -- the map ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, fx.Proxy):  # traced by lipfx.certificate: the graph sees x + g(x)
            self._check(x)
        return x + self.branch(x)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(f"InvertibleResidual is certified for inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}: build the block with example_inputs of that size")

    # -- constants ----------------------------------------------------------------------------
    def contraction(self) -> float:
        """The certified Lipschitz constant c of the branch (eval mode, current weights); < 1.
        Recomputed only when the weights changed."""
        self._refresh()
        return self._cached[0]

    def lipschitz(self) -> float:
        """Certified Lipschitz constant of the block: 1 + c."""
        return 1.0 + self.contraction()

    def inverse_lipschitz(self) -> float:
        """Certified Lipschitz constant of the inverse: 1 / (1 - c)."""
        return 1.0 / (1.0 - self.contraction())

    def _weights_key(self) -> tuple:
        # parameters and the constants K; not the power-iteration vectors, which every
        # training forward updates without changing the eval-mode weights
        tensors = list(self.branch.parameters()) + [b for n, b in self.branch.named_buffers() if n.rpartition(".")[2] == "K"]
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)

    @torch.no_grad()
    def _refresh(self) -> None:
        key = self._weights_key()
        if key == self._key:
            return
        x = torch.zeros(1, *self.input_shape, dtype=_dtype(self.branch), device=_device(self.branch))
        with eval_mode(self.branch):
            cert = certificate(self.branch, x)
            if not cert.bound < 1:
                raise LipfxError(f"InvertibleResidual: the branch's certificate is {cert.bound:.6g} >= 1 "
                                 "(were layers left unnormalized or their constants raised?)")
            propagate_shapes(self.branch, x)  # bake needs node shapes; a reloaded graph has none
            reference = bake(self.branch).double()
        self._cached, self._key = (cert.bound, reference), key

    # -- inverse ------------------------------------------------------------------------------
    @torch.no_grad()
    def inverse(self, y: torch.Tensor, tol: float = 1e-6, max_iter: Optional[int] = None, *,
                dtype: Optional[torch.dtype] = None, return_info: bool = False, strict: bool = False):
        """The x with ``x + g(x) = y``, by the fixed-point iteration ``x <- y - g(x)``, for the
        eval-mode block (the certified map; a block in training mode warns).

        ``tol`` bounds ||x - x*|| per sample (l2 norm over all non-batch dims), x* the exact
        preimage of ``y``. Banach's a-priori bound c^k/(1-c) ||x_1 - x_0|| gives the iterations
        needed for tol/2 (the default ``max_iter``; the other half is left for round-off); each
        sample stops when its a-posteriori bound (c ||x_k - x_{k-1}|| + rho) / (1 - c) is <= tol,
        rho being the round-off of one step measured against a float64 evaluation. The returned
        bound is then certified from the float64 residual: ||x - x*|| <= ||x + g(x) - y|| / (1 - c).

        ``dtype=torch.float64`` iterates in float64 on a float64 copy of the branch with the
        same (eval-mode) weights, and returns float64: for tolerances below the input dtype's
        round-off (float32 alone is ~1e-7 ||y|| / (1 - c)). Returns x, or an
        :class:`InverseResult` with ``return_info=True``. When a sample misses ``tol``, warns, or
        raises LipfxError with ``strict=True``.
        """
        self._check(y)
        if self.training:
            warnings.warn("InvertibleResidual.inverse inverts the eval-mode block (certified weights), but this block "
                          "is in training mode, where forward uses the training-time bound: call .eval() so that "
                          "forward and inverse are the same map", RuntimeWarning, stacklevel=2)
        if not tol > 0:
            raise ArgumentError(f"tol must be positive, got {tol}")
        if not bool(torch.isfinite(y).all()):
            raise ArgumentError("inverse of a non-finite input")
        c = self.contraction()
        reference = self._cached[1]
        work = y.dtype if dtype is None else dtype
        if work == _dtype(self.branch):
            g = self.branch
        elif work == torch.float64:
            g = reference
        else:
            raise ArgumentError(f"inverse in {work}: the branch is {_dtype(self.branch)}; use that or torch.float64")
        y = y.to(work)
        with eval_mode(g):
            x = y - g(y)
            y64 = y.double()
            rho = _norm(x.double() - (y64 - reference(y64))) * 2 + _norm(y64) * torch.finfo(work).eps
            step = _norm(x - y)
            apriori = _apriori(step, c, tol / 2)
            limit = int(apriori.max()) if max_iter is None else int(max_iter)
            iterations = torch.ones(y.shape[0], dtype=torch.long, device=y.device)
            done = _stop(step, rho, c, tol)
            k = 1
            while k < limit and not bool(done.all()):
                new = y - g(x)
                step = _norm(new - x)
                keep = done.view(-1, *([1] * (y.dim() - 1)))
                x = torch.where(keep, x, new)
                k += 1
                iterations = torch.where(done, iterations, torch.full_like(iterations, k))
                done = done | _stop(step, rho, c, tol)
        x64 = x.double()
        g64 = reference(x64)
        # float64 rounding of the residual itself, with room for the branch's long dot products
        residual = _norm(x64 + g64 - y64) + 1024 * torch.finfo(torch.float64).eps * (_norm(y64) + _norm(g64))
        bound = residual / (1 - c)
        converged = bound <= tol
        if not bool(converged.all()):
            _missed("InvertibleResidual", converged, bound, tol, strict,
                    f"after {k} iterations; round-off floor in {y.dtype} ~{float(rho.max()) / (1 - c):.3g}; "
                    "raise max_iter, use float64, or a larger tol")
        if return_info:
            return InverseResult(x, iterations, bound, converged)
        return x

    # -- log-determinant ----------------------------------------------------------------------
    def logdet(self, x: torch.Tensor, method: str = "series", **kwargs) -> torch.Tensor:
        """log|det(I + J_g(x))| per sample; see :meth:`forward_and_logdet` for the options."""
        return self.forward_and_logdet(x, method, **kwargs)[1]

    def forward_and_logdet(self, x: torch.Tensor, method: str = "series", *, n_terms: int = 8, n_exact: int = 2,
                           p: float = 0.5, n_samples: int = 1, gradient: str = "neumann",
                           generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` with one evaluation of the branch.

        method:
            ``"series"``: sum_{k=1}^{n_terms} (-1)^(k+1) tr(J^k) / k, each trace by Hutchinson's
            estimator with ``n_samples`` Gaussian vectors (biased by the truncated tail, at most
            d c^(n+1) / ((n+1)(1-c)) for d dims).
            ``"roulette"``: Residual Flows' unbiased estimator: the first ``n_exact`` terms, then
            terms up to a random N with P(N >= k) = (1-p)^(k - n_exact), each reweighted by
            1 / P(N >= k). Its variance is finite when c^2 < 1 - p.
            ``"exact"``: slogdet of the dense Jacobian (inputs of at most 4096 dims).
        gradient: ``"neumann"`` (the Neumann-series gradient: one extra vector-Jacobian product
            with a graph, memory independent of the number of terms) or ``"backprop"``
            (differentiate the estimate itself; deterministic for a fixed ``generator``).
        """
        self._check(x)
        if method not in LOGDET_METHODS:
            raise ArgumentError(f"unknown logdet method {method!r}; choose from {LOGDET_METHODS}")
        if gradient not in ("neumann", "backprop"):
            raise ArgumentError(f"unknown gradient {gradient!r}; choose 'neumann' or 'backprop'")
        if method == "exact":
            return self._exact(x)
        coefs = _coefficients(method, n_terms, n_exact, p, x.device, generator)
        want_graph = torch.is_grad_enabled()
        backprop = want_graph and gradient == "backprop"
        with torch.enable_grad():
            xi = x if x.requires_grad else x.detach().requires_grad_(True)
            gx = self.branch(xi)
            estimate = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            surrogate = torch.zeros_like(estimate)
            for _ in range(n_samples):
                v = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
                w, neumann = v, torch.zeros_like(v)
                for k, coef in enumerate(coefs, start=1):
                    sign = 1.0 if k % 2 else -1.0
                    neumann = neumann + (sign * coef) * w  # weight of tr(J^(k-1) dJ) in d(term k)
                    w = torch.autograd.grad(gx, xi, w, retain_graph=True, create_graph=backprop)[0]
                    estimate = estimate + (sign * coef / k) * _dot(w, v)
                if want_graph and gradient == "neumann":
                    # with u fixed, d(u^T J v) = u^T dJ v: the Neumann-series gradient of logdet
                    uj = torch.autograd.grad(gx, xi, neumann, retain_graph=True, create_graph=True)[0]
                    surrogate = surrogate + _dot(uj, v)
            if want_graph and gradient == "neumann":
                estimate = estimate.detach() + (surrogate - surrogate.detach())
            estimate = estimate / n_samples
        y = x + (gx if want_graph else gx.detach())
        return y, (estimate if want_graph else estimate.detach())

    def _exact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = math.prod(self.input_shape)
        if d > _EXACT_MAX_DIM:
            raise ArgumentError(f"exact logdet needs a dense {d}x{d} Jacobian per sample; use method='series' or 'roulette'")
        batch = x.shape[0]
        want_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xi = x if x.requires_grad else x.detach().requires_grad_(True)
            gx = self.branch(xi)
            # samples are independent: row i of every sample's Jacobian in one vjp on the batch sum
            eye = torch.eye(d, dtype=x.dtype, device=x.device)
            rows = [torch.autograd.grad(gx, xi, e.reshape(self.input_shape).expand_as(gx), retain_graph=True,
                                        create_graph=want_graph)[0].reshape(batch, d) for e in eye]
        jac = torch.stack(rows, dim=1)  # (batch, out, in)
        logdet = torch.linalg.slogdet(eye + jac).logabsdet
        if not want_graph:
            return x + gx.detach(), logdet.detach()
        return x + gx, logdet


class Squeeze(nn.Module):
    """Space-to-depth: (N, C, s1, ..., sd) -> (N, C f^d, s1/f, ..., sd/f). A permutation of the
    entries: norm 1, logdet 0, exact inverse (:class:`torch.nn.PixelUnshuffle` order in 2-D)."""

    _lipfx_leaf = True  # its reshapes depend on the input shape: a leaf with its own rule

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
        y = y if dtype is None else y.to(dtype)
        n, cf, *sizes = y.shape
        f, d = self.factor, len(sizes)
        if cf % f ** d:
            raise ShapeError(f"Squeeze(factor={f}).inverse: {cf} channels are not divisible by {f ** d}")
        c = cf // f ** d
        x = y.reshape([n, c] + [f] * d + sizes)
        order = [0, 1] + [q for i in range(d) for q in (2 + d + i, 2 + i)]
        x = x.permute(order).reshape(n, c, *(s * f for s in sizes))
        if return_info:
            zeros = torch.zeros(n, dtype=torch.float64, device=y.device)
            return InverseResult(x, torch.zeros(n, dtype=torch.long, device=y.device), zeros, zeros <= tol)
        return x

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


class InvertibleSequential(nn.Sequential):
    """A chain of :class:`InvertibleResidual` and :class:`Squeeze` (or any module with
    ``inverse``, ``forward_and_logdet``, ``lipschitz`` and ``inverse_lipschitz``)."""

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
        """Invert block by block, last first, and return x in ``y``'s dtype.

        An error e in a later block's inverse reaches x amplified by the earlier inverses'
        constants (up to prod 1/(1 - c_j): 1e7 for seven blocks at c = 0.9), so block k gets the
        tolerance tol / (n * prod_{j<k} Lip(inverse_j)), and the intermediates are computed in
        float64 (``dtype``; None keeps ``y``'s dtype) where float32 could not meet such
        tolerances. The returned bound is sum_k bound_k * prod_{j<k} Lip(inverse_j), plus the
        rounding of x to ``y``'s dtype.
        """
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
                info = m.inverse(x, tol / (len(blocks) * a), max_iter, dtype=x.dtype, return_info=True)
                x = info.x
                total = total + info.error_bound * a
                iterations = iterations + info.iterations
        out = x.to(y.dtype)
        total = total + _norm(out.double() - x.double())
        converged = total <= tol
        if not bool(converged.all()):
            _missed("InvertibleSequential", converged, total, tol, strict,
                    f"the inverse's Lipschitz bound is {self.inverse_lipschitz():.3g}")
        return InverseResult(out, iterations, total, converged) if return_info else out


def _missed(who: str, converged: torch.Tensor, bound: torch.Tensor, tol: float, strict: bool, detail: str) -> None:
    """Samples whose certified error exceeds tol: raise (strict), or warn at the line that called
    ``inverse`` (past ``inverse`` and its torch.no_grad wrapper)."""
    msg = (f"{who}.inverse: {int((~converged).sum())} of {converged.numel()} samples missed tol={tol:g} "
           f"(worst certified error {float(bound.max()):.3g}; {detail})")
    if strict:
        raise LipfxError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norm over all non-batch dims, in float64."""
    return t.double().flatten(1).norm(dim=1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(dim=1)


def _stop(step: torch.Tensor, rho: torch.Tensor, c: float, tol: float) -> torch.Tensor:
    """A-posteriori test (c ||x_k - x_{k-1}|| + rho) / (1 - c) <= tol, or stagnation: steps as
    small as the round-off, where more iterations cannot help (the final check then decides)."""
    return ((c * step + rho) / (1 - c) <= tol) | (step <= 2 * rho)


def _apriori(first_step: torch.Tensor, c: float, tol: float) -> torch.Tensor:
    """Banach: iterations k with c^k / (1 - c) ||x_1 - x_0|| <= tol (at least 1)."""
    if c == 0:
        return torch.ones_like(first_step, dtype=torch.long)
    need = torch.log(tol * (1 - c) / first_step.clamp_min(1e-300)) / math.log(c)
    return need.ceil().clamp(min=1).long()


def _coefficients(method: str, n_terms: int, n_exact: int, p: float, device: torch.device,
                  generator: Optional[torch.Generator]) -> list[float]:
    """Weights of the series terms k = 1, 2, ...: all 1 (truncated), or 1 / P(N >= k)."""
    if method == "series":
        if n_terms < 1:
            raise ArgumentError(f"n_terms must be >= 1, got {n_terms}")
        return [1.0] * n_terms
    if not 0 < p < 1:
        raise ArgumentError(f"p must be in (0, 1), got {p}")
    if n_exact < 1:
        raise ArgumentError(f"n_exact must be >= 1, got {n_exact}")
    # M ~ Geometric(p) on {0, 1, ...}: P(M >= m) = (1 - p)^m, N = n_exact + M
    u = torch.rand((), generator=generator, device=device if generator is not None else None).item()
    extra = int(math.floor(math.log1p(-u) / math.log1p(-p))) if u > 0 else 0
    return [1.0] * n_exact + [(1 - p) ** -m for m in range(1, extra + 1)]


def _dtype(module: nn.Module) -> torch.dtype:
    return next((t.dtype for t in module.parameters() if t.is_floating_point()), torch.get_default_dtype())


def _device(module: nn.Module) -> torch.device:
    return next((t.device for t in module.parameters()), torch.device("cpu"))


@register_module_rule(Squeeze)
def _squeeze_rule(ctx) -> Step:
    return Step.scale(1.0, "space-to-depth: a permutation")
