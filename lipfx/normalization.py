"""Spectral normalization with per-layer constants K (MATH sections 1, 2, 5, 7).

Each conv, linear and :class:`~lipfx.layers.ChannelAffine` of a converted network gets a
``torch.nn.utils.parametrize`` parametrization ``W -> W * scale / bound(W)``, visible in
``print(model)``, with ``scale = K`` (hard) or ``K * tanh(s)`` (soft, ``s`` learnable):

- pointwise (1x1) convs and linear layers: the Cout x Cin connectivity matrix (per group), by a
  warm-started power iteration whose state is one vector per group (MATH 5);
- depthwise and other spatial convs: the circulant/FFT bound at the layer's input resolution,
  polyphase when strided (MATH 1-3), differentiated through;
- ChannelAffine: max |scale| (exact).

Training mode computes the bound on every forward (power iteration converges from below, so a
pointwise layer can exceed K by about the stopping tolerance), outside autograd: the bound's
gradient has a closed form (a rank-r block at the argmax, :class:`~lipfx.norms.training.BlockGradient`)
that one hand-written backward applies, so the normalization adds a handful of small kernels per
layer to a training step. Eval mode computes the *certified*
bound once, with a margin for float round-off in the rescaled weight, and caches the normalized
weight until the parameters change: then every layer's norm is <= K exactly.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from .errors import LipfxError
from .layers import ChannelAffine, SeparableConv
from .norms.conv import conv_bound, grouped_matrix_norm
from .norms.estimators import grouped_power_iteration, power_steps
from .norms.geometry import ConvGeometry, conv_geometry
from .norms.training import BlockGradient, Peak, peak, peak_gradient, peak_map, tap_drift
from .passes.report import ConversionReport
from .tracing import input_shapes

KSpec = Union[float, Mapping[str, Optional[float]], Callable[[str, nn.Module], Optional[float]]]
SCALINGS = ("hard", "soft")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PRIME_ITERS = 1000  # power iterations at registration, so training starts warm


class TrainBound(NamedTuple):
    """A training-mode bound: its value and, when asked for, its gradient."""

    value: float
    gradient: Optional[BlockGradient]


class _Rescale(torch.autograd.Function):
    """``weight * scale / bound`` where ``bound`` was computed outside autograd and its gradient
    ``D`` is given factored (:class:`BlockGradient`). For G the incoming gradient and
    t = <G, W>: dW = (scale / b) (G - (t / b) D), d scale = t / b."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor, bound: float, grad: BlockGradient) -> torch.Tensor:
        # ctx-style forward: the setup_context style binds arguments through inspect.signature
        # on every call, which costs more than the whole normalization of a small layer
        ctx.save_for_backward(weight, scale, grad.left, grad.right)
        ctx.bound, ctx.group, ctx.factor = bound, grad.group, float(scale.detach()) / bound
        return weight * ctx.factor

    @staticmethod
    @once_differentiable  # the bound's gradient is first-order only; a double backward raises
    def backward(ctx, grad_out: torch.Tensor):
        weight, scale, left, right = ctx.saved_tensors
        b, c = ctx.bound, ctx.factor
        t = float(torch.dot(grad_out.reshape(-1), weight.reshape(-1)))
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            # c G - (c t / b) D, in as few passes over G as the groups allow (large pointwise
            # and linear weights make a training step memory-bound here)
            g = grad_out.reshape(-1, left.shape[0], right.shape[1])
            if g.shape[0] == 1:
                grad_w = torch.addmm(g[0], left, right, beta=c, alpha=-c * t / b)
            else:
                grad_w = g * c
                grad_w[ctx.group].addmm_(left, right, alpha=-c * t / b)
            grad_w = grad_w.view(weight.shape)
        if ctx.needs_input_grad[1]:
            grad_s = torch.tensor(t / b, dtype=scale.dtype, device=scale.device)
        return grad_w, grad_s, None, None


class LipschitzNormalization(nn.Module):
    """Parametrization ``W -> W * scale / bound(W)``; subclasses say how ``bound`` is computed.

    Buffers (in the state_dict): ``K``; parameter ``s`` for soft scaling; subclasses add their
    own state (the power-iteration vectors). Nothing depends on the input batch.
    """

    kind = "?"

    def __init__(self, K: float, scaling: str = "hard", s_init: float = 3.0, name: str = "") -> None:
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; choose from {SCALINGS}")
        _check_K(K, name)
        self.scaling = scaling
        self.name = name
        # in the default dtype, so model.to(dtype) keeps it in the weights' dtype (no cast per step)
        self.register_buffer("K", torch.tensor(float(K)))
        self.s = nn.Parameter(torch.tensor(float(s_init))) if scaling == "soft" else None
        self._cache_key: Optional[tuple] = None  # eval-mode factor and weight, see _eval_factor
        self._cache_weight_key: Optional[tuple] = None
        self._cache_weight: Optional[torch.Tensor] = None
        self._cache_factor = 0.0
        self._prepared: Optional[tuple] = None  # this forward's weight, see _prepare_hook

    # -- what subclasses provide -------------------------------------------------------------
    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        """The bound used in training mode (``weight`` detached), with its gradient if asked."""
        raise NotImplementedError

    def exact_bound(self, weight: torch.Tensor) -> float:
        """Certified upper bound on the layer's norm (float64), used in eval mode."""
        raise NotImplementedError

    def rounding_terms(self, weight: torch.Tensor) -> float:
        """c with ||op(E)|| <= c * u * ||op(W)|| for an entrywise relative error u in W."""
        return 1.0

    # -- the parametrization -----------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        """The layer's constant: K (hard) or K * tanh(s) (soft)."""
        k = self.K
        if self.s is None:
            return k
        return k.to(self.s.dtype) * torch.tanh(self.s)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            prepared, self._prepared = self._prepared, None
            if (prepared is not None and prepared[0] is weight and prepared[1] == weight._version
                    and prepared[2] == torch.is_grad_enabled()):
                return prepared[3]  # computed with every other layer's at the start of this forward
            return self._train_forward(weight)
        factor = self._eval_factor(weight)
        needs_grad = torch.is_grad_enabled() and (weight.requires_grad or (self.s is not None and self.s.requires_grad))
        if needs_grad:
            # The exact bound is a constant here: gradients reach W (and s), not through the bound.
            return weight * (self.scale().to(weight.dtype) * factor)
        if self._cache_weight is None or self._cache_weight_key != self._cache_key:
            self._cache_weight = weight.detach() * (float(self.scale()) * factor)
            self._cache_weight_key = self._cache_key
        return self._cache_weight

    @torch.compiler.disable  # python-side state and data-dependent steps: run eagerly
    def _train_forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.scale()
        needs_grad = torch.is_grad_enabled() and (weight.requires_grad or scale.requires_grad)
        bound = self.train_bound(weight.detach(), gradient=needs_grad)
        value = max(bound.value, torch.finfo(weight.dtype).tiny)
        if not needs_grad or bound.gradient is None:  # (None: an empty tensor, nothing to differentiate)
            return weight * (scale.to(weight.dtype) / value)
        return _Rescale.apply(weight, scale, value, bound.gradient)

    @torch.compiler.disable  # python-side cache and float64 certificates: run eagerly
    def _eval_factor(self, weight: torch.Tensor) -> float:
        """1 / (bound * (1 + delta)), recomputed only when the weight changed.

        delta covers rounding the rescaled weight to its dtype: an entrywise relative error of
        ~2u (scalar cast + product) moves the operator norm by at most rounding_terms * 2u.
        """
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, self.K._version,
               None if self.s is None else self.s._version)
        if key != self._cache_key:
            u = torch.finfo(weight.dtype).eps / 2
            delta = 4 * u * (self.rounding_terms(weight) + 1)
            bound = self.exact_bound(weight.detach())
            # a zero operator stays zero (and 0 * 1/tiny would be 0 * inf = nan in float32)
            self._cache_factor = 1.0 / (bound * (1 + delta)) if bound > 0 else 0.0
            self._cache_key = key
        return self._cache_factor

    def clear_cache(self) -> None:
        """Forget the eval-mode factor and weight (recomputed on the next eval forward)."""
        self._cache_key = self._cache_weight = self._cache_weight_key = None
        self._cache_factor = 0.0
        self._prepared = None

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_prepared"] = None  # a non-leaf tensor of a running forward: never copied or pickled
        return state

    def constant(self) -> float:
        """The current per-layer constant (K, or K * tanh(s))."""
        return float(self.scale().detach())

    def extra_repr(self) -> str:
        k = f"K={float(self.K):.6g}"
        scale = "hard" if self.s is None else f"soft K*tanh(s), s={float(self.s.detach()):.4g}"
        return f"{k}, {scale}, bound={self.kind}"


class MatrixNormalization(LipschitzNormalization):
    """Linear layers and 1x1 convs: the (per-group) Cout x Cin matrix, by power iteration."""

    def __init__(self, weight: torch.Tensor, groups: int, K: float, scaling: str = "hard",
                 s_init: float = 3.0, eps: float = 0.01, max_iter: int = 100, name: str = "") -> None:
        super().__init__(K, scaling, s_init, name)
        self.groups = groups
        self.eps = eps
        self.max_iter = max_iter
        cin_g = weight[0].numel()
        v = torch.randn(groups, cin_g, dtype=weight.dtype, device=weight.device)
        self.register_buffer("v", v / torch.linalg.vector_norm(v, dim=-1, keepdim=True))
        self.kind = f"power-iteration(eps={eps:g})"
        self.prime(weight)

    def _matrices(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.groups, weight.shape[0] // self.groups, -1)

    @torch.no_grad()
    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        """Warm-started power iteration per group, stopped when every group's residual
        ||A^T A v - sigma^2 v|| <= eps sigma^2; sigma = ||A v|| with gradient u v^T."""
        steps = power_steps(self._matrices(weight), self.v, self.eps, self.max_iter)
        self.v.copy_(steps.next)
        group = int(steps.sigma.argmax()) if self.groups > 1 else 0
        value = float(steps.sigma[group])
        if not gradient:
            return TrainBound(value, None)
        return TrainBound(value, BlockGradient(group, steps.u[group].unsqueeze(1), steps.v[group].unsqueeze(0)))

    @torch.no_grad()
    def prime(self, weight: torch.Tensor, iters: int = _PRIME_ITERS) -> None:
        """Converge the power-iteration state, so the first training steps start warm."""
        res = grouped_power_iteration(self._matrices(weight.detach()), self.v, self.eps * 1e-3, iters)
        self.v.copy_(res.v)

    def exact_bound(self, weight: torch.Tensor) -> float:
        return grouped_matrix_norm(weight.reshape(weight.shape[0], -1), self.groups)

    def rounding_terms(self, weight: torch.Tensor) -> float:
        rows, cols = weight.shape[0] // self.groups, weight[0].numel()
        return math.sqrt(min(rows, cols))


class _Reference(NamedTuple):
    """A conv's last full FFT evaluation: the kernel then, its bound, and (size, peak) pairs."""

    weight: torch.Tensor
    bound: float
    peaks: list


class ConvNormalization(LipschitzNormalization):
    """Depthwise and other spatial convs: the FFT / polyphase bound at the input resolution(s).

    ``sizes``: the spatial input sizes the layer is used at (one per call site); the bound is
    the max over them. ``refresh``: relative kernel drift that triggers a full evaluation in
    training (see :meth:`train_bound`).
    """

    def __init__(self, conv: nn.Module, sizes: Sequence[Sequence[int]], K: float, scaling: str = "hard",
                 s_init: float = 3.0, name: str = "", refresh: float = 1e-3) -> None:
        super().__init__(K, scaling, s_init, name)
        geom = conv_geometry(conv, name)
        self.groups, self.stride, self.dilation = geom.groups, geom.stride, geom.dilation
        self.pads, self.padding_mode = geom.pads, geom.padding_mode
        self.sizes = tuple(tuple(int(n) for n in s) for s in sizes)
        for n in self.sizes:
            geom.check_input(n, name)
        self.kind = "fft@" + ",".join("x".join(map(str, n)) for n in self.sizes)
        self.refresh = refresh
        # the last full evaluation, and the peak block's singular vector (the gradient's power
        # iteration warm-starts from it); both saved as the module's extra state
        self._ref: Optional[_Reference] = None
        self._grad_start: Optional[tuple] = None
        self._map: Optional[tuple] = None  # (peak key, dtype, device) and peak_map's matrix

    def _geometry(self, weight: torch.Tensor) -> ConvGeometry:
        return ConvGeometry(weight, self.groups, self.stride, self.dilation, self.pads, self.padding_mode)

    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        """The FFT bound, recomputed over the whole spectrum only when the kernel has drifted.

        Between full evaluations every block norm moves by at most the tap drift
        (:func:`tap_drift`), so ``bound_at_last_full + drift`` is still an upper bound; its
        gradient is taken as that of the current norm of the last peak's block. A full
        evaluation runs when the drift exceeds ``refresh`` times the bound, which keeps the
        normalized norm within that factor of K.
        """
        ref = self._ref
        bound = None
        if ref is not None and (ref.weight.shape, ref.weight.dtype, ref.weight.device) == (weight.shape, weight.dtype, weight.device):
            drift = tap_drift(weight - ref.weight, self.groups) * max(p.factor for _, p in ref.peaks)
            if drift <= self.refresh * ref.bound:
                bound = ref.bound + drift
        if bound is None:
            geom = self._geometry(weight)
            peaks = [(n, peak(geom, n)) for n in self.sizes]
            self._ref = ref = _Reference(weight.clone(), max(p.value for _, p in peaks), peaks)
            bound = ref.bound
        if not gradient:
            return TrainBound(bound, None)
        n, at = max(ref.peaks, key=lambda item: item[1].value)
        key = (tuple(n), at.group, tuple(at.freq))
        if self._map is None or self._map[0] != (key, weight.dtype, weight.device):
            self._map = ((key, weight.dtype, weight.device), peak_map(self._geometry(weight), n, at))
        start = self._grad_start[1] if self._grad_start is not None and self._grad_start[0] == key else None
        _, grad, vector = peak_gradient(weight, self.groups, self._map[1], at, start)
        self._grad_start = None if vector is None else (key, vector)
        return TrainBound(bound, grad)

    def get_extra_state(self) -> dict:
        """The last full evaluation, so a reloaded model trains on exactly as the saved one
        (plain types only: loads with ``torch.load(weights_only=True)``)."""
        if self._ref is None:
            return {}
        state = {"weight": self._ref.weight, "bound": self._ref.bound,
                 "peaks": [(tuple(n), p.group, tuple(p.freq), p.factor, p.value) for n, p in self._ref.peaks]}
        if self._grad_start is not None:
            state["grad_key"], state["grad_vector"] = self._grad_start
        return state

    def set_extra_state(self, state: dict) -> None:
        self._grad_start = None
        if not state:
            self._ref = None
            return
        peaks = [(tuple(n), Peak(int(g), tuple(f), float(fac), float(v))) for n, g, f, fac, v in state["peaks"]]
        self._ref = _Reference(state["weight"], float(state["bound"]), peaks)
        if "grad_vector" in state:
            n, group, freq = state["grad_key"]
            self._grad_start = ((tuple(n), int(group), tuple(freq)), state["grad_vector"])

    def exact_bound(self, weight: torch.Tensor) -> float:
        geom = self._geometry(weight)
        return max(conv_bound(geom, n, self.name) for n in self.sizes)

    def rounding_terms(self, weight: torch.Tensor) -> float:
        # ||op(E)|| <= sum over taps ||E_t||_F <= taps * sqrt(rank) * u * max_t ||W_t||_2, and
        # every tap's matrix norm is at most the operator norm.
        rows, cols = weight.shape[0] // self.groups, weight.shape[1]
        return math.prod(weight.shape[2:]) * math.sqrt(min(rows, cols))


class DiagonalNormalization(LipschitzNormalization):
    """A per-channel scale (:class:`ChannelAffine`): its norm is max |scale|, exactly."""

    kind = "max|scale|"

    @torch.no_grad()
    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        if weight.numel() == 0:
            return TrainBound(0.0, None)
        value, index = weight.abs().max(0)
        if not gradient:
            return TrainBound(float(value), None)
        k = int(index)  # d max|s| / ds = sign(s_k) e_k: row-group k of weight.reshape(-1, 1, 1)
        return TrainBound(float(value), BlockGradient(k, torch.sign(weight[k]).reshape(1, 1), weight.new_ones(1, 1)))

    def exact_bound(self, weight: torch.Tensor) -> float:
        return float(weight.abs().max()) if weight.numel() else 0.0


def _check_K(K: object, name: str) -> None:
    if isinstance(K, bool) or not isinstance(K, (int, float)) or not (0 < float(K) < math.inf):
        where = f" for '{name}'" if name else ""
        raise LipfxError(f"K{where} must be a positive finite number, got {K!r}")


def resolve_K(K: KSpec, name: str, module: nn.Module, parent: Optional[str] = None) -> Optional[float]:
    """The constant for module ``name``: K itself, the first matching pattern, or K(name, module).

    Patterns (``fnmatch``) are tried against the module's name and, for the two halves of a
    depthwise-separable pair, the name of the original conv (``parent``). ``None`` leaves a
    layer unnormalized.
    """
    if callable(K) and not isinstance(K, Mapping):
        value = K(name, module)
    elif isinstance(K, Mapping):
        names = [name] + ([parent] if parent else [])
        for pattern, k in K.items():
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                value = k
                break
        else:
            raise LipfxError(
                f"no K pattern matches layer '{name}' (patterns: {list(K)}); add '*' for a default, "
                "or map a pattern to None to leave layers unnormalized"
            )
    else:
        value = K
    if value is not None:
        _check_K(value, name)
    return None if value is None else float(value)


def normalized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, LipschitzNormalization]]:
    """(name, module, parametrization) for every layer lipfx normalized in ``model``."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():
            for p in plist:
                if isinstance(p, LipschitzNormalization):
                    yield name, module, p


def set_constants(model: nn.Module, K: KSpec) -> None:
    """Change the per-layer constants of an already normalized model (same rules as ``normalize``)."""
    modules = dict(model.named_modules())
    for name, module, p in normalized_layers(model):
        k = resolve_K(K, name, module, _separable_parent(name, modules))
        if k is None:
            raise LipfxError(f"layer '{name}' is normalized; K cannot switch it off (use lipfx.bake first)")
        p.K.fill_(k)


def _separable_parent(name: str, modules: Mapping[str, nn.Module]) -> Optional[str]:
    parent = name.rpartition(".")[0]
    return parent if isinstance(modules.get(parent), SeparableConv) else None


def normalize(
    gm: fx.GraphModule,
    K: KSpec = 1.0,
    *,
    scaling: str = "hard",
    s_init: float = 3.0,
    eps: float = 0.01,
    refresh: float = 1e-3,
    batched: bool = True,
    report: Optional[ConversionReport] = None,
) -> fx.GraphModule:
    """Register a :class:`LipschitzNormalization` on every conv, linear and ChannelAffine that
    ``gm``'s graph calls. In place; returns ``gm``.

    ``gm`` needs ``node.meta['tensor_meta']`` (``lipfx.convert`` records it; otherwise run
    ``lipfx.tracing.propagate_shapes``): spatial convs are bounded at their input resolution.

    Args:
        K: one constant for every layer, a dict of module-name patterns to constants (first
            match wins; ``None`` leaves matching layers alone), or ``K(name, module)``.
        scaling: ``"hard"`` (multiply by K) or ``"soft"`` (by K * tanh(s), s learnable).
        s_init: initial s for soft scaling (Runkel et al.: 3 for K <= 20, 0.5 above).
        eps: relative stopping tolerance of the power iteration.
        refresh: for spatial convs in training, the relative kernel drift (bounded through the
            taps) after which the FFT bound is searched over the whole spectrum again; in between
            the bound is the last one plus the drift, still an upper bound, so a layer's norm
            stays in [K / (1 + refresh), K]. Larger values mean fewer full searches.
        batched: compute every normalized weight back to back when a training forward of
            ``gm`` starts (forward hooks on ``gm``), instead of each just before its layer runs.
            Same values and gradients; the bounds' small kernels then run together, before the
            big convolutions have evicted their code and data from the caches, and their
            backward runs together after the network's (MobileNetV2 on a 2-core CPU, batch 32:
            1.022x instead of 1.033x the unnormalized step). With DistributedDataParallel this gives the weight gradients to the
            all-reduce at the end of the backward instead of layer by layer; ``False`` keeps
            them layer by layer. Calling a submodule of ``gm`` directly also computes its
            weights one by one.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; choose from {SCALINGS}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if not refresh >= 0:
        raise ValueError(f"refresh must be >= 0, got {refresh}")
    sizes = input_shapes(gm)
    modules = dict(gm.named_modules())
    for name, shapes in sizes.items():
        module = modules[name]
        if not isinstance(module, _CONVS + (nn.Linear, ChannelAffine)):
            continue
        attr = "scale" if isinstance(module, ChannelAffine) else "weight"
        if parametrize.is_parametrized(module, attr):
            raise LipfxError(f"layer '{name}' is already parametrized ({attr}); normalize it only once")
        k = resolve_K(K, name, module, _separable_parent(name, modules))
        if k is None:
            if report is not None:
                report.add(name, "not-normalized", "K is None")
            continue
        p = _make(module, shapes, k, scaling, s_init, eps, refresh, name)
        parametrize.register_parametrization(module, attr, p)
        if report is not None:
            report.add(name, "normalized", p.extra_repr())
    if batched:
        enable_batching(gm)
    return gm


def enable_batching(model: nn.Module) -> None:
    """Compute all of ``model``'s normalized weights together when its training forward starts
    (what ``normalize(batched=True)`` sets up; see there). Idempotent.

    The forward hooks survive ``copy.deepcopy`` of a GraphModule (which drops forward hooks
    itself) and ``lipfx.save``/``load``; ``lipfx.bake`` removes them.
    """
    if is_batched(model):
        return
    model.register_forward_pre_hook(_prepare_hook)
    model.register_forward_hook(_release_hook, always_call=True)
    copy_hooks = getattr(model, "_deepcopy_hooks", None)  # GraphModule runs these on its copies
    if isinstance(copy_hooks, list) and enable_batching not in copy_hooks:
        copy_hooks.append(enable_batching)


def disable_batching(model: nn.Module) -> None:
    """Undo :func:`enable_batching` on ``model``: each weight is computed at its layer again."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_prepare_hook, _release_hook)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    copy_hooks = getattr(model, "_deepcopy_hooks", None)
    if isinstance(copy_hooks, list) and enable_batching in copy_hooks:
        copy_hooks.remove(enable_batching)


def is_batched(model: nn.Module) -> bool:
    """Whether :func:`enable_batching` is in effect on ``model`` itself."""
    return _prepare_hook in model._forward_pre_hooks.values()


def _first_normalizations(model: nn.Module) -> Iterator[tuple[LipschitzNormalization, torch.Tensor]]:
    """(parametrization, its input) for every lipfx parametrization applied first to a tensor."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                if isinstance(plist[0], LipschitzNormalization) and hasattr(plist, "original"):
                    yield plist[0], plist.original


@torch.compiler.disable
def _prepare_hook(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook (``normalize(batched=True)``): compute all training-mode weights now.

    Each layer's forward takes its weight from here when the tensor, its version and the grad
    mode are unchanged, and computes it itself otherwise (a layer called twice, a weight
    swapped by ``functional_call``, ...)."""
    if not model.training:
        return  # eval mode caches its weights anyway
    grad = torch.is_grad_enabled()
    for p, weight in _first_normalizations(model):
        if p.training:
            p._prepared = (weight, weight._version, grad, p._train_forward(weight))


def _release_hook(model: nn.Module, args: tuple, output: object) -> None:
    """Forward hook: drop what a forward did not use (runs on exceptions too)."""
    if not model.training:
        return
    for p, _ in _first_normalizations(model):
        p._prepared = None


def _make(module: nn.Module, shapes: list[tuple[int, ...]], k: float, scaling: str, s_init: float,
          eps: float, refresh: float, name: str) -> LipschitzNormalization:
    if isinstance(module, ChannelAffine):
        return DiagonalNormalization(k, scaling, s_init, name)
    if isinstance(module, nn.Linear):
        return MatrixNormalization(module.weight, 1, k, scaling, s_init, eps, name=name)
    geom = conv_geometry(module, name)
    if geom.is_pointwise and all(lo == hi == 0 for lo, hi in geom.pads):
        return MatrixNormalization(module.weight, module.groups, k, scaling, s_init, eps, name=name)
    return ConvNormalization(module, [s[1:] for s in shapes], k, scaling, s_init, name, refresh)
