"""The layer kinds' bounds: power iteration for matrices, FFT for spatial convs, max|a| for scales.

- pointwise (1x1) convs and linear layers: the Cout x Cin connectivity matrix (per group), by a
  warm-started power iteration whose state is one vector per group (docs/math.md, section 5);
- depthwise and other spatial convs: the circulant/FFT bound at the layer's input resolution,
  polyphase when strided (sections 1-3), searched over the whole spectrum at every training
  step (section 7);
- ChannelAffine: max |scale| (exact).

Which module gets which kind is the ``normalization`` piece of its op table entry
(:mod:`lipfx.ops.layers`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..norms.conv import conv_bound, grouped_matrix_norm
from ..norms.estimators import grouped_power_iteration, power_steps
from ..norms.geometry import ConvGeometry, conv_geometry
from ..norms.training import BlockGradient, block_at, block_power_steps, spectrum_blocks, subgrid, tap_phases, top_vectors
from ..errors import ArgumentError
from .base import LipschitzNormalization, compute_dtype
from .options import POWER_ITERS
from .rescale import TrainBound

_PRIME_ITERS = 1000  # power iterations at registration, so training starts warm


class MatrixNormalization(LipschitzNormalization):
    """Linear layers and 1x1 convs: the (per-group) Cout x Cin matrix, by power iteration."""

    def __init__(self, weight: torch.Tensor, groups: int, K: float, scaling: str = "hard",
                 s_init: float = 3.0, power_iters: int = POWER_ITERS, name: str = "") -> None:
        super().__init__(K, scaling, s_init, name)
        self.groups = groups
        self.power_iters = check_power_iters(power_iters, name)
        cin_g = weight[0].numel()
        v = torch.randn(groups, cin_g, dtype=weight.dtype, device=weight.device)
        self.register_buffer("v", v / torch.linalg.vector_norm(v, dim=-1, keepdim=True))
        self.kind = f"power-iteration({self.power_iters}/step)"
        self.prime(weight)

    def _matrices(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.groups, weight.shape[0] // self.groups, -1)

    @torch.no_grad()
    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        """``power_iters`` warm-started power steps per group; sigma = ||A v|| (an estimate from
        below) with gradient u v^T at the group that attains the maximum. Everything stays on
        the device: the group is an on-device argmax, the residual is kept in ``residual``."""
        steps = power_steps(self._matrices(weight.to(compute_dtype(weight))), self.v, None, self.power_iters)
        self.v.copy_(steps.next)
        if self.groups == 1:
            group, value = 0, steps.sigma[0]
            u, v, res = steps.u[0], steps.v[0], steps.residual[0]
        else:
            group = steps.sigma.argmax()
            pick = group.reshape(1)
            value = steps.sigma.index_select(0, pick)[0]
            u, v, res = steps.u.index_select(0, pick)[0], steps.v.index_select(0, pick)[0], steps.residual.amax()
        self.residual.copy_(res)
        # sigma^2 + residual is the top of the interval [sigma^2 - r, sigma^2 + r] that holds an
        # eigenvalue of A^T A (Krylov-Weinstein): after a large weight change the warm vector
        # lags, its residual grows, and the value rises with it instead of falling short
        lift = torch.sqrt(1 + res)
        if not gradient:
            return TrainBound(value * lift, None)
        return TrainBound(value * lift, BlockGradient(group, (u * lift).unsqueeze(1), v.unsqueeze(0)))

    @torch.no_grad()
    def prime(self, weight: torch.Tensor, iters: int = _PRIME_ITERS) -> None:
        """Converge the power-iteration state, so the first training steps start warm."""
        res = grouped_power_iteration(self._matrices(weight.detach()), self.v, 1e-5, iters)
        self.v.copy_(res.v)

    def exact_bound(self, weight: torch.Tensor) -> float:
        return grouped_matrix_norm(weight.reshape(weight.shape[0], -1), self.groups)

    def rounding_terms(self, weight: torch.Tensor) -> float:
        rows, cols = weight.shape[0] // self.groups, weight[0].numel()
        return math.sqrt(min(rows, cols))


class ConvNormalization(LipschitzNormalization):
    """Depthwise and other spatial convs: the FFT / polyphase bound at the input resolution(s).

    ``sizes``: the spatial input sizes the layer is used at (one per call site); the bound is
    the max over them. Blocks with one row or column (depthwise convs) are bounded exactly at
    every training step; dense blocks (full convs) by ``power_iters`` warm power steps per block
    and step (docs/math.md, section 7.3).
    """

    differentiable_bound = True  # train_bound returns a value with autograd history (see base)

    def __init__(self, conv: nn.Module, sizes: Sequence[Sequence[int]], K: float, scaling: str = "hard",
                 s_init: float = 3.0, name: str = "", power_iters: int = POWER_ITERS) -> None:
        super().__init__(K, scaling, s_init, name)
        geom = conv_geometry(conv, name)
        self.groups, self.stride, self.dilation = geom.groups, geom.stride, geom.dilation
        self.pads, self.padding_mode = geom.pads, geom.padding_mode
        self.sizes = tuple(tuple(int(n) for n in s) for s in sizes)
        for n in self.sizes:
            geom.check_input(n, name)
        self.power_iters = check_power_iters(power_iters, name)
        weight = conv.weight.detach()
        cout_g, phases = weight.shape[0] // self.groups, math.prod(self.stride)
        self.dense = min(cout_g, weight.shape[1] * phases) > 1
        self.kind = "fft@" + ",".join("x".join(map(str, n)) for n in self.sizes)
        for i, n in enumerate(self.sizes):
            grid = subgrid(geom, n)
            rates, columns = tap_phases(grid.geometry, grid.sub)
            # host-side constants of the peak block's phase map, moved with the module
            self.register_buffer(f"_rates{i}", rates.to(weight.dtype), persistent=False)
            self.register_buffer(f"_columns{i}", columns, persistent=False)
            if self.dense:  # one warm singular vector per block, primed exactly
                vectors = top_vectors(spectrum_blocks(subgrid(self._geometry(weight.to(compute_dtype(weight))), n)))
                self.register_buffer(f"spectral_v{i}", torch.view_as_real(vectors).to(weight.dtype).contiguous())

    def _geometry(self, weight: torch.Tensor) -> ConvGeometry:
        return ConvGeometry(weight, self.groups, self.stride, self.dilation, self.pads, self.padding_mode)

    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        """The FFT bound over the whole spectrum at every input size, as a tensor whose autograd
        history is that of its argmax block (``weight`` is the live weight when ``gradient``).

        The spectrum is searched outside autograd; the peak block is rebuilt from the kernel
        with autograd (:func:`block_at`), so the gradient costs one block. Depthwise blocks are
        exact: the value is an upper bound up to round-off. Dense blocks advance their warm
        singular vectors by ``power_iters`` steps: an estimate (from below but for the residual lift), like the pointwise
        layers'.
        """
        w = weight.to(compute_dtype(weight))
        if not gradient:
            w = w.detach()
        values = []
        for i, n in enumerate(self.sizes):
            grid = subgrid(self._geometry(w.detach()), n)
            blocks = spectrum_blocks(grid)
            rates, columns = getattr(self, f"_rates{i}").to(w.dtype), getattr(self, f"_columns{i}")
            if not self.dense:  # rows or columns: the 2-norm is the Frobenius norm
                index = torch.view_as_real(blocks).square().sum((-1, -2, -3)).argmax()
                sigma = torch.linalg.vector_norm(block_at(w, self.groups, grid, index, rates, columns))
            else:
                state = getattr(self, f"spectral_v{i}")
                with torch.no_grad():
                    v, estimates = block_power_steps(blocks, torch.view_as_complex(state.to(w.dtype)), self.power_iters)
                    state.copy_(torch.view_as_real(v))
                    index = estimates.argmax()
                    top = v.index_select(0, index.reshape(1))[0]
                block = block_at(w, self.groups, grid, index, rates, columns)
                image = block @ top
                sigma = torch.linalg.vector_norm(image)
                with torch.no_grad():
                    res = (torch.linalg.vector_norm(block.mH @ image - sigma.square() * top)
                           / sigma.square().clamp_min(torch.finfo(w.dtype).tiny))
                    self.residual.copy_(res)
                sigma = sigma * torch.sqrt(1 + res)  # the Krylov-Weinstein lift, as for matrices
            values.append(sigma * grid.factor)
        value = values[0] if len(values) == 1 else torch.stack(values).amax()
        return TrainBound(value, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # checkpoints from before the spectrum was searched every step kept a drift reference as
        # extra state and had no block vectors: drop the one, keep the freshly primed others
        state_dict.pop(prefix + "_extra_state", None)
        for i in range(len(self.sizes)):
            key = prefix + f"spectral_v{i}"
            if self.dense and key not in state_dict:
                state_dict[key] = getattr(self, f"spectral_v{i}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

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
            return TrainBound(weight.new_zeros(()), None)
        value, index = weight.abs().max(0)
        if not gradient:
            return TrainBound(value, None)
        # d max|s| / ds = sign(s_k) e_k: row-group k of weight.reshape(-1, 1, 1), k on the device
        sign = torch.sign(weight.index_select(0, index.reshape(1))).reshape(1, 1)
        return TrainBound(value, BlockGradient(index, sign, weight.new_ones(1, 1)))

    def exact_bound(self, weight: torch.Tensor) -> float:
        return float(weight.abs().max()) if weight.numel() else 0.0


def check_power_iters(power_iters: object, name: str) -> int:
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
        where = f" for '{name}'" if name else ""
        raise ArgumentError(f"power_iters{where} must be a positive int, got {power_iters!r}")
    return power_iters
