"""The parametrization ``W -> W * scale / bound(W)`` shared by every layer kind.

``scale = K`` (hard) or ``K * tanh(s)`` (soft, ``s`` learnable). Training mode computes the bound
on every forward, outside autograd (:mod:`.rescale`). Eval mode computes the *certified* bound
once, with a margin for float round-off in the rescaled weight, and caches the normalized weight
until the parameters change: then every layer's norm is <= K exactly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import ArgumentError, LipfxError
from ..norms.estimators import generic_vector
from .rescale import TrainBound, compute_dtype, rescaled

SCALINGS = ("hard", "soft")


class LipschitzNormalization(nn.Module):
    """Parametrization ``W -> W * scale / bound(W)``; subclasses say how ``bound`` is computed.

    Buffers (in the state_dict): ``K``; parameter ``s`` for soft scaling; subclasses add their
    own state (the power-iteration vectors). Nothing depends on the input batch.
    """

    kind = "?"
    differentiable_bound = False  # True: train_bound gets the live weight and returns a value with autograd history
    # True: transform() alone gives norm <= 1 (AOL, orthogonal), so training divides by nothing;
    # eval mode then only ever scales down (by max(certified bound, 1)) and computes what training did
    bounded_by_construction = False
    # True: the bound is taken at the input sizes in ``sizes`` and holds there only (spatial convs
    # bounded by their FFT): normalize() adds check_input_size to the layer
    size_dependent = False

    def __init__(self, K: float, scaling: str = "hard", s_init: float = 3.0, name: str = "") -> None:
        super().__init__()
        if scaling not in SCALINGS:
            raise ArgumentError(f"unknown scaling {scaling!r}; choose from {SCALINGS}")
        check_K(K, name)
        self.scaling = scaling
        self.name = name
        # in the default dtype, so model.to(dtype) keeps it in the weights' dtype (no cast per step)
        self.register_buffer("K", torch.tensor(float(K)))
        self.s = nn.Parameter(torch.tensor(float(s_init))) if scaling == "soft" else None
        self._cache_key: Optional[tuple] = None  # eval-mode factor and weight, see _eval_factor
        self._cache_weight_key: Optional[tuple] = None
        self._cache_weight: Optional[torch.Tensor] = None
        self._cache_factor = 0.0
        self._cache_source: Optional[tuple] = None  # the weight (and transform state) the factor was computed for
        self._generation = 0
        self._prepared: Optional[tuple] = None  # this forward's weight, see _prepare_hook
        # relative residual ||A^T A v - sigma^2 v|| / sigma^2 of the last training step's power
        # iteration (0 where the bound is exact): a device tensor, read only when asked for
        self.register_buffer("residual", torch.zeros(()), persistent=False)

    # -- what subclasses provide -------------------------------------------------------------
    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        """The bound used in training mode as a 0-d tensor, with its gradient if asked: factored
        (``weight`` detached), or through autograd (``differentiable_bound``, ``weight`` live).
        Must not read tensor values on the host (tests/test_host_syncs.py counts)."""
        raise NotImplementedError

    def exact_bound(self, weight: torch.Tensor) -> float:
        """Certified upper bound on the layer's norm (float64), used in eval mode."""
        raise NotImplementedError

    def rounding_terms(self, weight: torch.Tensor) -> float:
        """c with ||op(E)|| <= c * u * ||op(W)|| for an entrywise relative error u in W."""
        return 1.0

    def transform(self, weight: torch.Tensor) -> torch.Tensor:
        """A differentiable map applied to the raw weight before it is bounded and rescaled
        (identity here; the orthogonal kinds orthogonalize). Bounds see its output."""
        return weight

    def transform_state(self) -> tuple:
        """Tensors besides the weight that :meth:`transform` reads: eval mode's cached factor is
        recomputed when any of them changes value."""
        return ()

    # -- the parametrization -----------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        """The layer's constant: K (hard) or K * tanh(s) (soft)."""
        k = self.K
        if self.s is None:
            return k
        return k.to(self.s.dtype) * torch.tanh(self.s)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            if not torch.compiler.is_compiling():
                prepared, self._prepared = self._prepared, None
                if (prepared is not None and prepared[0] is weight and prepared[1] == weight._version
                        and prepared[2] == torch.is_grad_enabled()):
                    return prepared[3]  # computed with every other layer's at the start of this forward
            return self._train_forward(weight)
        factor = self._eval_factor(weight)
        trainable = (weight,) + self.transform_state() + (() if self.s is None else (self.s,))
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in trainable)
        if needs_grad:
            # The exact bound is a constant here: gradients reach W (and s), not through the bound.
            return self._eval_weight(weight, factor)
        if self._cache_weight is None or self._cache_weight_key != self._cache_key:
            with torch.no_grad():
                self._cache_weight = self._eval_weight(weight.detach(), factor)
            self._cache_weight_key = self._cache_key
        return self._cache_weight

    def _eval_weight(self, weight: torch.Tensor, factor: float) -> torch.Tensor:
        """The eval-mode weight, one expression for both paths: with and without gradients the
        weight must be the same tensor, bit for bit (in float16 a scale rounded to the dtype
        first differed by 5e-4, so a certificate taken with gradients on missed the cached weight
        that inference used). The product is taken in float32 or wider and rounded once."""
        wide = compute_dtype(weight)
        return (self.transform(weight).to(wide) * (self.scale().to(wide) * factor)).to(weight.dtype)

    def _train_forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The training-mode weight: device tensors and static control flow only (no value is
        read on the host, so it neither waits for the device nor breaks a compiled graph)."""
        with _autocast_off(weight.device.type):  # bounds in float32 or wider, whatever autocast says
            weight = self.transform(weight)
            scale = self.scale()
            needs_grad = torch.is_grad_enabled() and (weight.requires_grad or scale.requires_grad)
            live = self.differentiable_bound and needs_grad
            bound = self.train_bound(weight if live else weight.detach(), gradient=needs_grad)
            return rescaled(weight, scale, bound, needs_grad)

    def batch_key(self, weight: torch.Tensor) -> Optional[tuple]:
        """Layers whose keys are equal and not None get their training weights from one call of
        ``type(self).train_forwards`` when a batched forward starts (:mod:`.batching`); None
        (the default): this layer computes its own."""
        return None

    @classmethod
    def train_forwards(cls, layers: Sequence[tuple["LipschitzNormalization", torch.Tensor]]) -> list[torch.Tensor]:
        """``_train_forward`` of many layers of one :meth:`batch_key`: each at its own here;
        kinds with a key compute them together."""
        return [p._train_forward(w) for p, w in layers]

    def _constant(self, key: tuple, make: Callable[[], Any]) -> Any:
        """What ``make`` builds from host constants alone (an identity, a generic vector, a batch
        layout), made once per ``key`` and kept beside the state, not in it (dropped from
        pickles); made afresh under torch.compile, where it becomes a constant of the graph."""
        if torch.compiler.is_compiling():
            return make()
        cache = self.__dict__.setdefault("_constants", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _mix(self, matrices: torch.Tensor) -> torch.Tensor:
        """The generic vector (one per column count of ``matrices``, real) that power steps add
        to their warm starts (:func:`~lipfx.norms.estimators.generic_vector`)."""
        n = matrices.shape[-1]
        return self._constant(("mix", n, matrices.dtype, matrices.device),
                              lambda: generic_vector(n, matrices.dtype, matrices.device))

    @torch.compiler.disable  # python-side cache and float64 certificates: run eagerly
    def _eval_factor(self, weight: torch.Tensor) -> float:
        """1 / (bound * (1 + delta)) (at most 1 for ``bounded_by_construction`` kinds), recomputed
        only when the weight changed.

        delta covers rounding the rescaled weight to its dtype: an entrywise relative error of
        ~2u (scalar cast + product) moves the operator norm by at most rounding_terms * 2u.
        """
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, float(self.K),
               None if self.s is None else float(self.s.detach()))
        # the version counter misses writes through .data (EMA updates, some loaders): compare
        # the values too, so the cache can never outlive the weight it was computed for
        inputs = (weight,) + self.transform_state()
        if (self._cache_key is None or key != self._cache_key[:-1] or len(inputs) != len(self._cache_source)
                or not all(torch.equal(a, b) for a, b in zip(inputs, self._cache_source))):
            u = torch.finfo(weight.dtype).eps / 2
            with torch.no_grad():
                mapped = self.transform(weight.detach())
            delta = 4 * u * (self.rounding_terms(mapped) + 1)
            bound = self.exact_bound(mapped) * (1 + delta)
            if self.bounded_by_construction:
                bound = max(bound, 1.0)
            # a zero operator stays zero (and 0 * 1/tiny would be 0 * inf = nan in float32)
            self._cache_factor = 1.0 / bound if bound > 0 else 0.0
            self._cache_source = tuple(t.detach().clone() for t in inputs)
            self._generation += 1
            self._cache_key = key + (self._generation,)
        return self._cache_factor

    def clear_cache(self) -> None:
        """Forget the eval-mode factor and weight (recomputed on the next eval forward)."""
        self._cache_key = self._cache_weight = self._cache_weight_key = self._cache_source = None
        self._cache_factor = 0.0
        self._prepared = None

    def __setstate__(self, state: dict) -> None:
        source = state.get("_cache_source")
        # pickles from before the value check (None) or from when it held the weight alone
        state["_cache_source"] = (source,) if isinstance(source, torch.Tensor) else source
        state.setdefault("_generation", 0)
        super().__setstate__(state)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_prepared"] = None  # a non-leaf tensor of a running forward: never copied or pickled
        state.pop("_constants", None)  # made again when needed
        return state

    def constant(self) -> float:
        """The current per-layer constant (K, or K * tanh(s))."""
        return float(self.scale().detach())

    def extra_repr(self) -> str:
        k = f"K={float(self.K):.6g}"
        scale = "hard" if self.s is None else f"soft K*tanh(s), s={float(self.s.detach()):.4g}"
        return f"{k}, {scale}, bound={self.kind}"


def add_size_check(module: nn.Module) -> None:
    """Give ``module`` the :func:`check_input_size` hook (idempotent): normalize() and load do."""
    if check_input_size not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(check_input_size)


def check_input_size(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a layer whose normalization is ``size_dependent``: warn, once per
    layer and size, when it is called at an input size its bound was not taken at. A conv's norm
    depends on the grid (docs/math.md 1): a 3-tap kernel bounded on 4 points had norm 1.15 K on
    32, silently, before this check."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return
    for plist in module.parametrizations.values():
        p = plist[0]
        if not getattr(p, "size_dependent", False) or not p.sizes or x.dim() < len(p.sizes[0]):
            continue
        n = tuple(int(d) for d in x.shape[x.dim() - len(p.sizes[0]):])  # the trailing spatial dims (batched or not)
        if n not in p.sizes:
            warned = p.__dict__.setdefault("_warned_sizes", set())
            if n not in warned:
                warned.add(n)
                sizes = ", ".join("x".join(map(str, s)) for s in p.sizes)
                here = "x".join(map(str, n))
                warnings.warn(f"lipfx: layer '{p.name}' is normalized at input size {sizes} (the example input's), "
                              f"but is called at {here}: there its norm can exceed K={float(p.K):g}. Convert with an "
                              f"example input of the size you train and run at.", stacklevel=2)


def check_K(K: object, name: str) -> None:
    if isinstance(K, bool) or not isinstance(K, (int, float)) or not (0 < float(K) < math.inf):
        where = f" for '{name}'" if name else ""
        raise LipfxError(f"K{where} must be a positive finite number, got {K!r}")


def exact_map_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the gradient-norm-preserving maps (Cayley, Björck, AOL, BCOP) are computed in:
    :func:`compute_dtype`, except float64 for float32 on CUDA. There cuDNN runs float32 convs
    in TF32 by default and ``torch.set_float32_matmul_precision("high")`` does the same for
    matmuls: operands rounded to 10 mantissa bits, and a weight built from rounded factors
    misses (co-)isometry by ~1e-4 to 1e-3, above the norm <= 1 these maps claim. The maps act
    on weights, not activations, so float64 costs little next to the step."""
    dtype = compute_dtype(weight)
    return torch.float64 if weight.is_cuda and dtype == torch.float32 else dtype


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
