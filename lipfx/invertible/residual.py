"""The invertible residual block ``y = x + g(x)`` with a certified contraction of g."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from ..bake import bake
from ..certify import certificate
from ..convert import convert
from ..errors import ArgumentError, LipfxError, ShapeError
from ..normalization import normalized_layers
from ..normalization.options import POWER_ITERS, warn_retired
from ..ops.table import node_entry
from ..tracing import Inputs, as_tuple, eval_mode, propagate_shapes, trace
from . import logdet as _logdet
from .fixed_point import InverseResult, apriori, missed, module_device, module_dtype, norm, stop, warn_return_info

EVERY_SIZE = "every input size"
PROBE_SIZE = 16  # spatial size the branch is converted and normalized at without example_inputs


class InvertibleResidual(nn.Module):
    """``y = x + g(x)`` with g converted and normalized so that its certificate is <= ``coeff``.

    Args:
        branch: the residual branch g (any torch.fx-traceable module; the original is not modified).
        coeff: the contraction to enforce, 0 < coeff < 1.
        example_inputs: one input (with batch dim) of the size the block will be used at; the
            FFT bounds of convolutions, and so the certificate, hold at that size, and
            :meth:`forward` refuses others. ``None``: certify at every input size, with
            resolution-free conv bounds (looser than one size's FFT bound); the input channels
            come from g's first layer, and inputs of any size are accepted.
        separable: rewrite convs into depthwise-separable pairs (``"exact"``, ``"fresh"``) or keep
            them whole (``None``, the default: one tight FFT bound per conv, so the certified
            contraction is close to ``coeff``; a separable pair's two factors bound it loosely).
        bn, scaling, power_iters, leaf_modules: as in :func:`lipfx.convert`. ``eps`` and
            ``refresh`` are retired (ignored, with a warning).

    Attributes:
        certified_at: where the contraction holds: the input shape without batch dim (a tuple)
            given by ``example_inputs``, or ``"every input size"`` (:data:`EVERY_SIZE`). In the
            latter case g is normalized at a probe size and its constants are fitted so that the
            resolution-free certificate is <= ``coeff`` at construction; training keeps each
            layer's norm at the probe size, and the contraction is re-certified (resolution-free)
            from the current weights whenever they change (a LipfxError if it reaches 1).

    Raises LipfxError naming the culprit nodes when g has no finite certificate (LayerNorm,
    attention, products of activations, ...) or when fixed parts of g alone exceed ``coeff``.
    """

    def __init__(self, branch: nn.Module, coeff: float = 0.9, example_inputs: Optional[Inputs] = None, *,
                 separable: Optional[str] = None, bn: Optional[str] = "fold", scaling: str = "hard",
                 power_iters: int = POWER_ITERS, leaf_modules: Sequence[str] = (),
                 eps: Optional[float] = None, refresh: Optional[float] = None) -> None:
        super().__init__()
        warn_retired(eps, refresh, "InvertibleResidual")
        if not 0 < coeff < 1:
            raise ArgumentError(f"coeff must be in (0, 1) for an invertible block, got {coeff}")
        every_size = example_inputs is None
        x = _probe(branch, leaf_modules) if every_size else as_tuple(example_inputs)[0][:1]
        try:
            self.branch: fx.GraphModule = convert(branch, x, K=1.0, lipschitz=coeff, separable=separable, bn=bn,
                                                  scaling=scaling, power_iters=power_iters,
                                                  leaf_modules=leaf_modules)
            if every_size:
                _check_size_free(self.branch)
                self.branch.lipfx_certificate = _fit_every_size(self.branch, coeff, x)
        except ArgumentError:
            raise
        except LipfxError as exc:
            raise LipfxError(f"InvertibleResidual({type(branch).__name__}): cannot certify the branch below "
                             f"coeff={coeff}: {exc}") from exc
        self.coeff = float(coeff)
        self.certified_at: Union[str, tuple[int, ...]] = EVERY_SIZE if every_size else tuple(x.shape[1:])
        self._probe_shape = tuple(x.shape[1:])  # the input the certificate is computed on
        # the certified constant and a float64 plain copy of the branch, for the weights in _key;
        # a tuple, so the copy is not registered as a submodule (nor saved in the state_dict)
        self._key: Optional[tuple] = None
        self._snapshot: tuple[torch.Tensor, ...] = ()  # the values _key's tensors had then
        self._cached: tuple[float, Optional[nn.Module]] = (math.nan, None)

    @property
    def input_shape(self) -> Optional[tuple[int, ...]]:
        """The one input shape (without batch) the block accepts, or None (every size)."""
        return None if self.certified_at == EVERY_SIZE else self.certified_at

    def extra_repr(self) -> str:
        at = self.certified_at if self.certified_at == EVERY_SIZE else "x".join(map(str, self.certified_at))
        return f"coeff={self.coeff:g}, certified_at={at}"

    # -- the map ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, fx.Proxy):  # traced by lipfx.certificate: the graph sees x + g(x)
            self._check(x)
        return x + self.branch(x)

    def _check(self, x: torch.Tensor) -> None:
        shape = self.input_shape
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise ShapeError(f"InvertibleResidual is certified for inputs of shape (N, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}: build the block with example_inputs of that size, or with "
                             "example_inputs=None to certify it at every input size")
        if shape is None and x.dim() != len(self._probe_shape) + 1:
            raise ShapeError(f"InvertibleResidual expects inputs with {len(self._probe_shape) + 1} dims "
                             f"(N, {self._probe_shape[0]}, ...), got {tuple(x.shape)}")

    # -- constants ----------------------------------------------------------------------------
    def contraction(self) -> float:
        """The certified Lipschitz constant c of the branch (eval mode, current weights) where
        :attr:`certified_at` says; < 1. Recomputed only when the weights changed."""
        self._refresh()
        return self._cached[0]

    def lipschitz(self) -> float:
        """Certified Lipschitz constant of the block: 1 + c."""
        return 1.0 + self.contraction()

    def inverse_lipschitz(self) -> float:
        """Certified Lipschitz constant of the inverse: 1 / (1 - c)."""
        return 1.0 / (1.0 - self.contraction())

    def _state(self) -> list[torch.Tensor]:
        """What sets the branch's eval-mode function: its parameters and buffers (BatchNorm
        statistics, the constants K), not the normalizations' power-iteration state, which
        every training forward updates without changing the eval-mode weights."""
        return list(self.branch.parameters()) + [
            b for n, b in self.branch.named_buffers() if "parametrizations." not in n or n.rpartition(".")[2] == "K"]

    @torch.no_grad()
    def _refresh(self) -> None:
        state = self._state()
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in state)
        # values are compared too: writes through .data (EMA updates, some loaders) keep the
        # version counter, and a stale contraction or reference made the inverse report
        # convergence 17 away from the answer
        snapshot = getattr(self, "_snapshot", ())
        if key == self._key and len(snapshot) == len(state) and all(torch.equal(a, b) for a, b in zip(snapshot, state)):
            return
        x = torch.zeros(1, *self._probe_shape, dtype=module_dtype(self.branch), device=module_device(self.branch))
        with eval_mode(self.branch):
            cert = _certify(self.branch, x, self.input_shape is None)
            if not cert.bound < 1:
                raise LipfxError(f"InvertibleResidual: the branch's certificate is {cert.bound:.6g} >= 1 "
                                 "(were layers left unnormalized or their constants raised?)")
            propagate_shapes(self.branch, x)  # bake needs node shapes; a reloaded graph has none
            reference = bake(self.branch).double()
        self._cached, self._key = (cert.bound, reference), key
        self._snapshot = tuple(t.detach().clone() for t in state)

    # -- inverse ------------------------------------------------------------------------------
    @torch.no_grad()
    def inverse(self, y: torch.Tensor, tol: float = 1e-6, max_iter: Optional[int] = None, *,
                dtype: Optional[torch.dtype] = None, return_info: bool = False, strict: bool = False):
        """The x with ``x + g(x) = y`` (a tensor); see :meth:`inverse_with_info`, which also
        returns the certified error bound. ``return_info=True`` is deprecated: it returns that
        method's :class:`InverseResult`."""
        if return_info:
            warn_return_info("InvertibleResidual")
        info, detail = self._solve(y, tol, max_iter, dtype)
        if not bool(info.converged.all()):
            missed("InvertibleResidual", info.converged, info.error_bound, tol, strict, detail)
        return info if return_info else info.x

    @torch.no_grad()
    def inverse_with_info(self, y: torch.Tensor, tol: float = 1e-6, max_iter: Optional[int] = None, *,
                          dtype: Optional[torch.dtype] = None, strict: bool = False) -> InverseResult:
        """The x with ``x + g(x) = y``, by the fixed-point iteration ``x <- y - g(x)``, for the
        eval-mode block (the certified map; a block in training mode warns), as an
        :class:`InverseResult` (per sample: x, iterations, certified error bound, converged).

        ``tol`` bounds ||x - x*|| per sample (l2 norm over all non-batch dims), x* the exact
        preimage of ``y``. Banach's a-priori bound c^k/(1-c) ||x_1 - x_0|| gives the iterations
        needed for tol/2 (the default ``max_iter``; the other half is left for round-off); each
        sample stops when its a-posteriori bound (c ||x_k - x_{k-1}|| + rho) / (1 - c) is <= tol,
        rho being the round-off of one step measured against a float64 evaluation. The returned
        bound is then certified from the float64 residual: ||x - x*|| <= ||x + g(x) - y|| / (1 - c).

        ``dtype=torch.float64`` iterates in float64 on a float64 copy of the branch with the
        same (eval-mode) weights, and returns float64: for tolerances below the input dtype's
        round-off (float32 alone is ~1e-7 ||y|| / (1 - c)). When a sample misses ``tol``, warns,
        or raises LipfxError with ``strict=True``.
        """
        info, detail = self._solve(y, tol, max_iter, dtype)
        if not bool(info.converged.all()):
            missed("InvertibleResidual", info.converged, info.error_bound, tol, strict, detail)
        return info

    def _solve(self, y: torch.Tensor, tol: float, max_iter: Optional[int],
               dtype: Optional[torch.dtype]) -> tuple[InverseResult, str]:
        self._check(y)
        if self.training:
            warnings.warn("InvertibleResidual.inverse inverts the eval-mode block (certified weights), but this block "
                          "is in training mode, where forward uses the training-time bound: call .eval() so that "
                          "forward and inverse are the same map", RuntimeWarning, stacklevel=4)
        if not tol > 0:
            raise ArgumentError(f"tol must be positive, got {tol}")
        if not bool(torch.isfinite(y).all()):
            raise ArgumentError("inverse of a non-finite input")
        c = self.contraction()
        reference = self._cached[1]
        work = y.dtype if dtype is None else dtype
        if work == module_dtype(self.branch):
            g = self.branch
        elif work == torch.float64:
            g = reference
        else:
            raise ArgumentError(f"inverse in {work}: the branch is {module_dtype(self.branch)}; use that or torch.float64")
        y = y.to(work)
        with eval_mode(g):
            x = y - g(y)
            y64 = y.double()
            rho = norm(x.double() - (y64 - reference(y64))) * 2 + norm(y64) * torch.finfo(work).eps
            step = norm(x - y)
            limit = int(apriori(step, c, tol / 2).max()) if max_iter is None else int(max_iter)
            iterations = torch.ones(y.shape[0], dtype=torch.long, device=y.device)
            done = stop(step, rho, c, tol)
            k = 1
            while k < limit and not bool(done.all()):
                new = y - g(x)
                step = norm(new - x)
                keep = done.view(-1, *([1] * (y.dim() - 1)))
                x = torch.where(keep, x, new)
                k += 1
                iterations = torch.where(done, iterations, torch.full_like(iterations, k))
                done = done | stop(step, rho, c, tol)
        x64 = x.double()
        g64 = reference(x64)
        # float64 rounding of the residual itself, with room for the branch's long dot products
        residual = norm(x64 + g64 - y64) + 1024 * torch.finfo(torch.float64).eps * (norm(y64) + norm(g64))
        bound = residual / (1 - c)
        detail = (f"after {k} iterations; round-off floor in {y.dtype} ~{float(rho.max()) / (1 - c):.3g}; "
                  "raise max_iter, use float64, or a larger tol")
        return InverseResult(x, iterations, bound, bound <= tol), detail

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
        _logdet.check_options(method, gradient)
        if method == "exact":
            return _logdet.exact_logdet(self.branch, x)
        return _logdet.series_logdet(self.branch, x, method, n_terms=n_terms, n_exact=n_exact, p=p,
                                     n_samples=n_samples, gradient=gradient, generator=generator)


# -- certifying at every input size -------------------------------------------------------------
def _certify(branch: fx.GraphModule, x: torch.Tensor, every_size: bool):
    if not every_size:
        return certificate(branch, x)
    # resolution-free conv bounds; no dense or composed regions, which hold at x's size only
    return certificate(branch, x, method="resolution-free", compose_linear=False)


def _probe(branch: nn.Module, leaf_modules: Sequence[str]) -> torch.Tensor:
    """An input for ``branch`` made from its first layer: (1, C, 16, ..., 16) for a conv,
    (1, in_features) for a linear layer."""
    gm = trace(nn.Sequential(branch) if isinstance(branch, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) else branch,
               leaf_modules)
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next((n for n in gm.graph.nodes if n.op == "call_module" and n.args and n.args[0] in placeholders), None)
    module = modules.get(first.target) if first is not None else None
    dtype = next((p.dtype for p in branch.parameters() if p.is_floating_point()), torch.get_default_dtype())
    device = next((p.device for p in branch.parameters()), torch.device("cpu"))
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        d = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[next(t for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, t))]
        return torch.zeros(1, module.in_channels, *([PROBE_SIZE] * d), dtype=dtype, device=device)
    if isinstance(module, nn.Linear):
        return torch.zeros(1, module.in_features, dtype=dtype, device=device)
    what = f"its first layer is {type(module).__name__}" if module is not None else "it does not start with a layer"
    raise ArgumentError(f"InvertibleResidual({type(branch).__name__}, example_inputs=None): cannot tell the input "
                        f"channels ({what}; a conv or linear layer is needed): pass example_inputs")


def _check_size_free(gm: fx.GraphModule) -> None:
    """Refuse ops whose certificate rule depends on the input size (pooling, padding, reductions,
    broadcasts, dense regions): the certificate at the probe size would not hold at others. Which
    ops are free of it is the ``size_free`` piece of their op table entry."""
    modules = dict(gm.named_modules())
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        entry = node_entry(n, modules)
        ok = entry is not None and entry.size_free
        if ok and len(n.all_input_nodes) > 1:  # sums and the like: no broadcasting, whose copies grow with size
            shapes = [a.meta.get("tensor_meta") for a in n.all_input_nodes] + [n.meta.get("tensor_meta")]
            ok = all(m is not None and tuple(m.shape) == tuple(shapes[-1].shape) for m in shapes)
        if not ok:
            what = type(modules[n.target]).__name__ if n.op == "call_module" else getattr(n.target, "__name__", str(n.target))
            raise ArgumentError(f"node '{n.name}' ({what}): its Lipschitz factor may depend on the input size, so "
                                "the branch cannot be certified at every input size: pass example_inputs")


@torch.no_grad()
def _fit_every_size(gm: fx.GraphModule, coeff: float, x: torch.Tensor):
    """Scale every normalized layer's K by one factor t <= 1 so the resolution-free certificate
    is <= coeff (each eval weight is W K / bound(W): scaling K by t scales its bound by t), and
    return that certificate."""
    from ..budget import largest_within

    plain = certificate(gm, x, method="resolution-free", compose_linear=False)
    if plain.bound <= coeff:
        return plain
    layers = {name: p for name, _, p in normalized_layers(gm)}
    t = min(1.0, largest_within(lambda t: plain.evaluate({n: t for n in layers}), coeff))
    for p in layers.values():
        exact = float(p.K) * t
        k = torch.tensor(exact, dtype=p.K.dtype)
        if float(k) > exact:  # round down, never up
            k = torch.nextafter(k, torch.zeros_like(k))
        p.K.copy_(k)
    final = certificate(gm, x, method="resolution-free", compose_linear=False)
    if final.bound > coeff:
        raise LipfxError(f"internal error: the resolution-free certificate is {final.bound:.6g} > coeff={coeff} "
                         f"after scaling the constants by {t:.6g}")
