"""The layer kinds' bounds: power iteration for matrices, FFT for spatial convs, max|a| for scales.

- pointwise (1x1) convs and linear layers: the Cout x Cin connectivity matrix (per group), by a
  warm-started power iteration whose state is one vector per group (docs/math.md, section 5);
- depthwise and other spatial convs: the circulant/FFT bound at the layer's input resolution,
  polyphase when strided (sections 1-3), with a drift bound between full evaluations (section 7);
- ChannelAffine: max |scale| (exact).

Which module gets which kind is the ``normalization`` piece of its op table entry
(:mod:`lipfx.ops.layers`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..norms.conv import conv_bound, grouped_matrix_norm
from ..norms.estimators import grouped_power_iteration, power_steps
from ..norms.geometry import ConvGeometry, conv_geometry
from ..norms.training import BlockGradient, Peak, peak, peak_gradient, peak_map, tap_drift
from .base import LipschitzNormalization
from .rescale import TrainBound

_PRIME_ITERS = 1000  # power iterations at registration, so training starts warm


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
        evaluation runs when the drift d exceeds ``refresh`` (r) times the bound b. The true norm
        is then at least b - d, so the normalized norm stays in [K (1 - r) / (1 + r), K].
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
