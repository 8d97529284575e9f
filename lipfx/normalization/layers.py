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

import itertools
import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..norms.conv import conv_bound, grouped_matrix_norm
from ..norms.estimators import (WARM_MIX, PowerStepsList, fixed_power_steps, fixed_power_steps_list,
                                grouped_power_iteration)
from ..norms.geometry import ConvGeometry, conv_geometry
from ..norms.training import (ROW_BASIS_LIMIT, SWEEP_BUDGET, SWEEP_TOP, BlockGradient, Grid, block_at, block_power_steps, complex_norm,
                              row_basis_size, row_spectrum, row_spectrum_basis, tap_drift,
                              subgrid, tap_phases, top_vectors)
from .base import LipschitzNormalization, _autocast_off, compute_dtype
from .options import POWER_ITERS, check_power_iters
from .rescale import TrainBound, rescaled_many

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

    def batch_key(self, weight: torch.Tensor) -> Optional[tuple]:
        # one matrix, bounded as it is: many such layers share one call of train_forwards
        if self.groups != 1 or type(self).transform is not LipschitzNormalization.transform:
            return None
        return (type(self), self.power_iters, weight.dtype, weight.device)

    @classmethod
    def train_forwards(cls, layers: Sequence[tuple["MatrixNormalization", torch.Tensor]]) -> list[torch.Tensor]:
        """The training-mode weights of many one-matrix layers of one :meth:`batch_key`, as
        :meth:`train_bound` and ``_train_forward`` compute them one at a time (the same steps,
        the same state updates), with the power steps' vector work shared by all of them."""
        norms = [p for p, _ in layers]
        weights = [w for _, w in layers]
        with _autocast_off(weights[0].device.type):
            with torch.no_grad():
                mats = [w.detach().to(compute_dtype(w)).reshape(w.shape[0], -1) for w in weights]
                steps = fixed_power_steps_list(mats, [p.v[0] for p in norms], norms[0].power_iters,
                                               [p._mix(m) for p, m in zip(norms, mats)])
                bounds = _lifted(norms, steps)
            return rescaled_many(weights, [p.scale() for p in norms], bounds)

    @torch.no_grad()
    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        """``power_iters`` warm-started power steps per group; sigma = ||A v|| (an estimate from
        below) with gradient u v^T at the group that attains the maximum. Everything stays on
        the device: the group is an on-device argmax, the residual is kept in ``residual``."""
        if self.groups == 1:  # the batched path's arithmetic, so both give the same weights
            mat = weight.to(compute_dtype(weight)).reshape(weight.shape[0], -1)
            [bound] = _lifted([self], fixed_power_steps_list([mat], [self.v[0]], self.power_iters, [self._mix(mat)]))
            return bound if gradient else TrainBound(bound.value, None)
        mats = self._matrices(weight.to(compute_dtype(weight)))
        steps = fixed_power_steps(mats, self.v, self.power_iters, self._mix(mats))
        self.v.copy_(steps.next)
        group = steps.sigma.argmax()
        pick = group.reshape(1)
        value, res = steps.sigma.index_select(0, pick)[0], steps.residual.amax()
        left, right = steps.u.index_select(0, pick).mT, steps.v.index_select(0, pick)
        self.residual.copy_(res)
        # sigma^2 + residual is the top of the interval [sigma^2 - r, sigma^2 + r] that holds an
        # eigenvalue of A^T A (Krylov-Weinstein): after a large weight change the warm vector
        # lags, its residual grows, and the value rises with it instead of falling short
        lift = torch.sqrt(1 + res)
        if not gradient:
            return TrainBound(value * lift, None)
        return TrainBound(value * lift, BlockGradient(group, left * lift, right))

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


@torch.no_grad()
def _lifted(norms: Sequence[MatrixNormalization], steps: PowerStepsList) -> list[TrainBound]:
    """Store the state of one-matrix layers' power steps (next vectors, residuals) and return
    their bounds sigma * sqrt(1 + residual) with the gradient factors (see train_bound)."""
    torch._foreach_copy_([p.v[0] for p in norms], steps.next)
    torch._foreach_copy_([p.residual for p in norms], steps.residual)
    lift = torch._foreach_sqrt(torch._foreach_add(steps.residual, 1.0))
    values = torch._foreach_mul(steps.sigma, lift)
    lefts = torch._foreach_mul(steps.u, lift)
    return [TrainBound(value, BlockGradient(0, left.unsqueeze(1), right.unsqueeze(0)))
            for value, left, right in zip(values, lefts, steps.v)]


_PRECISE = ("_pairs", "_cosines", "_vals", "_slack", "spectral_v", "_prev")


class SpatialConvFrame:
    """What every spatial conv's normalization is bounded by: the conv's geometry and the input
    sizes it is used at. Mixed in before :class:`LipschitzNormalization`; provides the eval-mode
    ``exact_bound`` (FFT / polyphase, the max over the sizes) and ``rounding_terms``."""

    def _set_frame(self, conv: nn.Module, sizes: Sequence[Sequence[int]], name: str) -> ConvGeometry:
        geom = conv_geometry(conv, name)
        self.groups, self.stride, self.dilation = geom.groups, geom.stride, geom.dilation
        self.pads, self.padding_mode = geom.pads, geom.padding_mode
        self.sizes = tuple(tuple(int(n) for n in s) for s in sizes)
        for n in self.sizes:
            geom.check_input(n, name)
        return geom

    def _sizes_label(self) -> str:
        return ",".join("x".join(map(str, n)) for n in self.sizes)

    def _geometry(self, weight: torch.Tensor) -> ConvGeometry:
        return ConvGeometry(weight, self.groups, self.stride, self.dilation, self.pads, self.padding_mode)

    def exact_bound(self, weight: torch.Tensor) -> float:
        geom = self._geometry(weight)
        return max(conv_bound(geom, n, self.name) for n in self.sizes)

    def rounding_terms(self, weight: torch.Tensor) -> float:
        # ||op(E)|| <= sum over taps ||E_t||_F <= taps * sqrt(rank) * u * max_t ||W_t||_2, and
        # every tap's matrix norm is at most the operator norm.
        rows, cols = weight.shape[0] // self.groups, weight.shape[1]
        return math.prod(weight.shape[2:]) * math.sqrt(min(rows, cols))


class ConvNormalization(SpatialConvFrame, LipschitzNormalization):
    """Depthwise and other spatial convs: the FFT / polyphase bound at the input resolution(s).

    ``sizes``: the spatial input sizes the layer is used at (one per call site); the bound is
    the max over them. Blocks with one row or column (depthwise convs) are bounded exactly at
    every training step; dense blocks (full convs) by ``power_iters`` warm power steps per block
    and step (docs/math.md, section 7.3).
    """

    size_dependent = True

    @property
    def differentiable_bound(self) -> bool:  # type: ignore[override]
        """Swept sizes give their value with autograd history; when every size is bounded from
        the cosine table, the gradient comes in closed form (a :class:`BlockGradient`)."""
        return any(c is not None for c in self._chunks)

    def __init__(self, conv: nn.Module, sizes: Sequence[Sequence[int]], K: float, scaling: str = "hard",
                 s_init: float = 3.0, name: str = "", power_iters: int = POWER_ITERS) -> None:
        super().__init__(K, scaling, s_init, name)
        geom = self._set_frame(conv, sizes, name)
        self.power_iters = check_power_iters(power_iters, name)
        weight = conv.weight.detach()
        cout_g, phases = weight.shape[0] // self.groups, math.prod(self.stride)
        self.dense = min(cout_g, weight.shape[1] * phases) > 1
        self.kind = "fft@" + self._sizes_label()
        rows, taps = cout_g * weight.shape[1], math.prod(weight.shape[2:])
        self._chunks: list = []  # per size: None (whole spectrum by the cosine table) or blocks per step in turn
        self._tops: list = []  # per size: blocks per step with the largest bounds (swept sizes only)
        for i, n in enumerate(self.sizes):
            grid = subgrid(geom, n)
            if i == 0:  # host-side constants of the blocks' phase maps (integers), moved with the module
                steps, columns = tap_phases(grid.geometry)
                self.register_buffer("_steps", steps, persistent=False)
                self.register_buffer("_columns", columns, persistent=False)
            if not self.dense and row_basis_size(grid) <= ROW_BASIS_LIMIT:
                pairs, cosines = row_spectrum_basis(grid)  # float64, kept so (_apply)
                self.register_buffer(f"_pairs{i}", pairs, persistent=False)
                self.register_buffer(f"_cosines{i}", cosines, persistent=False)
                self._chunks.append(None)
                self._tops.append(0)
                continue
            blocks = self.groups * math.prod(grid.frequencies)
            per_step = max(1, min(blocks, SWEEP_BUDGET // ((rows + taps) * 2 * phases)))
            top = per_step // SWEEP_TOP if per_step < blocks else 0
            self._chunks.append(per_step - top)
            self._tops.append(top)
            state = compute_dtype(weight)  # never below float32 (_apply keeps it so)
            self.register_buffer(f"_vals{i}", weight.new_zeros(blocks, dtype=state))  # each block's norm when last evaluated
            self.register_buffer(f"_slack{i}", weight.new_zeros(blocks, dtype=state))  # drift since then
            self.register_buffer(f"_cursor{i}", torch.zeros((), dtype=torch.long))
            if self.dense:
                self.register_buffer(f"spectral_v{i}", weight.new_zeros(blocks, weight.shape[1] * phases, 2, dtype=state))
        if any(c is not None for c in self._chunks):
            # the kernel the slacks are measured from, at full precision: a later cast of the
            # weight (model.half()) then shows up as drift instead of rounding both alike
            self.register_buffer("_prev", weight.to(compute_dtype(weight)).clone())
            self._sweep_all(weight)

    def _apply(self, fn, recurse=True):
        """Moves and casts like any module, except that the cosine tables stay float64 and the
        sweep state never drops below float32 (its precision is part of the bound's soundness)."""
        kept = {name: t for name, t in self._buffers.items()
                if t is not None and t.is_floating_point() and name.startswith(_PRECISE)}
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            dtype = torch.float64 if name.startswith(("_pairs", "_cosines")) else \
                torch.promote_types(after.dtype, torch.promote_types(before.dtype, torch.float32))
            if after.dtype != dtype:
                self._buffers[name] = before.to(device=after.device, dtype=dtype)
        return out

    def batch_key(self, weight: torch.Tensor) -> Optional[tuple]:
        # every input size bounded from its cosine table (depthwise convs on small grids): layers
        # whose kernels have the same rows and taps share the power spectrum's work
        if self.differentiable_bound or type(self).transform is not LipschitzNormalization.transform:
            return None
        return (type(self), weight.shape[0] // self.groups * weight.shape[1], weight.shape[2:], weight.dtype, weight.device)

    @classmethod
    def train_forwards(cls, layers: Sequence[tuple["ConvNormalization", torch.Tensor]]) -> list[torch.Tensor]:
        """The training-mode weights of many layers of one :meth:`batch_key`, as ``_train_forward``
        computes them one at a time, with their bounds from :func:`_row_bounds_many`."""
        norms = [p for p, _ in layers]
        weights = [w for _, w in layers]
        with _autocast_off(weights[0].device.type):
            scales = [p.scale() for p in norms]
            grad = torch.is_grad_enabled() and any(w.requires_grad or s.requires_grad for w, s in zip(weights, scales))
            bounds = _row_bounds_many(norms, [w.detach().to(compute_dtype(w)) for w in weights], grad)
            return rescaled_many(weights, scales, bounds)

    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        """The FFT bound over the whole spectrum at every input size, as a 0-d tensor whose
        autograd history is that of its argmax block (``weight`` is the live weight when
        ``gradient``). Depthwise blocks are exact: the value is an upper bound up to round-off.
        Dense blocks advance their warm singular vectors by ``power_iters`` steps: an estimate,
        like the pointwise layers' (docs/math.md, 7.3).
        """
        w = weight.to(compute_dtype(weight))
        if not self.differentiable_bound:  # the batched path's arithmetic, so both give the same weights
            return _row_bounds_many([self], [w.detach()], gradient)[0]
        if not gradient:
            w = w.detach()
        values = []
        drift = None
        if hasattr(self, "_prev"):
            with torch.no_grad():
                drift = tap_drift(w.detach() - self._prev.to(w.dtype), self.groups)
        for i, n in enumerate(self.sizes):
            grid = subgrid(self._geometry(w.detach()), n)
            if self._chunks[i] is None:
                values.append(self._row_bound(w, i, grid) * grid.factor)
            else:
                values.append(self._swept_bound(w, i, grid, drift))
        if drift is not None:
            with torch.no_grad():
                self._prev.copy_(w.detach())
        value = values[0] if len(values) == 1 else torch.stack(values).amax()
        return TrainBound(value, None)

    def _identity(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The gradient's left factor (rows x rows), made once per dtype and device."""
        return self._constant(("eye", rows, like.dtype, like.device),
                              lambda: torch.eye(rows, dtype=like.dtype, device=like.device))

    def _grid_factors(self, w: torch.Tensor) -> tuple[float, ...]:
        """``subgrid``'s ||P|| at each size: host constants of the geometry, computed once."""
        factors = self.__dict__.get("_factors")
        if factors is None:
            factors = self.__dict__["_factors"] = tuple(subgrid(self._geometry(w), n).factor for n in self.sizes)
        return factors

    def _tables(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Size ``i``'s tables in ``dtype``: pairs (taps^2, D) and the cosines transposed (F, D),
        from the float64 buffers, made once and kept while the buffers are the same tensors (a
        move or cast of the module replaces them)."""
        pairs, cosines = getattr(self, f"_pairs{i}"), getattr(self, f"_cosines{i}")
        if torch.compiler.is_compiling():
            return pairs.to(dtype), cosines.T.to(dtype)
        cache = self.__dict__.setdefault("_cast_tables", {})
        hit = cache.get((i, dtype))
        if hit is None or hit[0] is not pairs or hit[1] is not cosines:
            hit = cache[(i, dtype)] = (pairs, cosines, pairs.to(dtype), cosines.T.to(dtype).contiguous())
        return hit[2], hit[3]

    def _row_bound(self, w: torch.Tensor, i: int, grid: Grid) -> torch.Tensor:
        """Blocks with one row or one column on a small grid (the 2-norm is the Frobenius norm):
        the whole power spectrum by two matmuls outside autograd, then the argmax block's
        ||A(f)||^2 = O_g . cos(f) again with autograd, so the backward touches one block."""
        pairs, cosines = getattr(self, f"_pairs{i}").to(w.dtype), getattr(self, f"_cosines{i}").to(w.dtype)
        with torch.no_grad():
            index = row_spectrum(w.detach(), self.groups, pairs, cosines).argmax().reshape(1)
        freqs = cosines.shape[1]
        kernels = w.reshape(self.groups, -1, math.prod(w.shape[2:]))
        kernel = kernels[0] if self.groups == 1 else kernels.index_select(0, index // freqs)[0]
        power = ((kernel.mT @ kernel).reshape(-1) @ pairs) @ cosines.index_select(1, index % freqs)
        return power[0].clamp_min(0).sqrt()

    @torch.no_grad()
    def _sweep_all(self, weight: torch.Tensor) -> None:
        """Evaluate every block of every swept size (at registration): exact norms, dense blocks
        primed with their exact top singular vectors."""
        w = weight.detach().to(compute_dtype(weight))
        for i, n in enumerate(self.sizes):
            chunk = self._chunks[i]
            if chunk is None:
                continue
            grid = subgrid(self._geometry(w), n)
            blocks = getattr(self, f"_vals{i}").shape[0]
            for start in range(0, blocks, chunk):
                self._evaluate(w, i, grid, torch.arange(start, min(start + chunk, blocks), device=w.device), prime=True)
            getattr(self, f"_cursor{i}").zero_()
        self._prev.copy_(w)

    @torch.no_grad()
    def _evaluate(self, w: torch.Tensor, i: int, grid: Grid, index: torch.Tensor, prime: bool = False) -> None:
        """Blocks ``index`` from the kernel now into the sweep state: their norms times ||P||
        (dense blocks: ``power_iters`` warm power steps, or from their exact top singular
        vectors with ``prime``), and no slack."""
        blocks = self._block(w, i, grid, index)
        if self.dense:
            state = getattr(self, f"spectral_v{i}")
            if prime:
                start = top_vectors(blocks)
            else:  # the warm vectors with the generic vector mixed in, as the pointwise layers' (5.2)
                start = torch.view_as_complex(state[index].to(w.dtype)) + WARM_MIX * self._mix(blocks.real)
                start = start / complex_norm(start, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
            v, est = block_power_steps(blocks, start, 0 if prime else self.power_iters)
            state.index_copy_(0, index, torch.view_as_real(v).to(state.dtype))
        else:
            est = complex_norm(blocks.reshape(index.shape[0], -1))
        vals = getattr(self, f"_vals{i}")
        vals.index_copy_(0, index, (est * grid.factor).to(vals.dtype))
        getattr(self, f"_slack{i}").index_fill_(0, index, 0)  # (slack[index] = 0 would copy a host scalar)

    def _swept_bound(self, w: torch.Tensor, i: int, grid: Grid, drift: torch.Tensor) -> torch.Tensor:
        """Spectra too large for every step: ``chunk`` blocks re-evaluated per step in turn and
        the ``top`` others with the largest bounds (value + slack), the rest bounded by their
        last value plus the kernel's tap drift since (section 7.4); the value has the gradient of
        the peak block's current norm. Re-evaluating the largest keeps the peak's slack near 0
        whatever the sweep's length: a stale block that overtakes them is refreshed the next step."""
        chunk, top = self._chunks[i], self._tops[i]
        vals, slack, cursor = (getattr(self, f"{k}{i}") for k in ("_vals", "_slack", "_cursor"))
        with torch.no_grad():
            slack.add_((drift * grid.factor).to(slack.dtype))
            index = (cursor + torch.arange(chunk, device=w.device)) % vals.shape[0]
            if top:  # disjoint from the blocks in turn: index_copy_ with repeated indices is nondeterministic
                scores = (vals + slack).index_fill_(0, index, -math.inf)
                index = torch.cat((index, scores.topk(top, sorted=False).indices))
            self._evaluate(w.detach(), i, grid, index)
            cursor.copy_((cursor + chunk) % vals.shape[0])
            bounds = vals.to(w.dtype) + slack.to(w.dtype)
            peak = bounds.argmax().reshape(1)  # index_select: a 0-d index tensor would be read on the host
            bound = bounds.index_select(0, peak)[0]
            self.residual.copy_(slack.index_select(0, peak)[0] / bound.clamp_min(torch.finfo(w.dtype).tiny))
        block = self._block(w, i, grid, peak)[0]
        if self.dense:
            top = torch.view_as_complex(getattr(self, f"spectral_v{i}").index_select(0, peak)[0].to(w.dtype))
            live = complex_norm(block @ top) * grid.factor
        else:
            live = complex_norm(block.reshape(-1)) * grid.factor
        return live + (bound - live).detach()

    def _block(self, w: torch.Tensor, i: int, grid: Grid, index: torch.Tensor) -> torch.Tensor:
        return block_at(w, self.groups, grid, index, self._steps, self._columns)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        for key in ("_cast_tables",):  # derived from the buffers: made again when needed
            state.pop(key, None)
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # checkpoints from before issue 17 kept a drift reference as extra state and no sweep
        # state: drop the one and keep this module's own for the other. Still sound: the slacks
        # then grow by the drift from the kernel they were measured at to the loaded one.
        state_dict.pop(prefix + "_extra_state", None)
        stale = [n for n, t in self._buffers.items()
                 if t is not None and n not in self._non_persistent_buffers_set and prefix + n not in state_dict]
        for n in stale:
            state_dict[prefix + n] = getattr(self, n)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class _RowBatch(NamedTuple):
    """How :func:`_row_bounds_many` lays out a batch: one entry per (layer, input size), entries
    ordered by cosine table so that each table's groups are one slice. Host constants, and device
    index tensors made by device-side fills (a tensor made from a Python list would be a blocking
    host-to-device copy on an accelerator)."""

    tables: tuple  # per table: (layer, size) of its first entry, its groups' slice, its entries' slice
    width: int  # the most groups of any entry
    erows: Optional[torch.Tensor]  # the kernel row of every entry's group (None: the kernels in order)
    slots: torch.Tensor  # each entry's group's place in (entries, width)
    starts: torch.Tensor  # (entries,) each entry's first group among the entries' groups
    rows: torch.Tensor  # (entries,) its layer's first kernel row
    factors: Optional[torch.Tensor]  # (entries,) ||P|| of each entry (None: all 1)
    layers: Optional[torch.Tensor]  # (layers, sizes) each layer's entries, -1 padded (None: one entry per layer, in order)


def _row_batch(norms: Sequence["ConvNormalization"], weights: Sequence[torch.Tensor]) -> _RowBatch:
    """The layout of a batch of ``norms``: made once per batch shape, kept by the first layer."""
    geometry = tuple((p.groups, p.sizes, p.stride, p.dilation, p.pads, p.padding_mode) for p in norms)
    key = ("rows", geometry, weights[0].dtype, weights[0].device)
    return norms[0]._constant(key, lambda: _make_row_batch(norms, weights))


def _make_row_batch(norms: Sequence["ConvNormalization"], weights: Sequence[torch.Tensor]) -> _RowBatch:
    device = weights[0].device

    def ints(values: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in values])

    lstarts = list(itertools.accumulate((p.groups for p in norms), initial=0))
    by_table: dict = {}  # geometry at one size -> its entries (layer, size), in first-seen order
    for k, p in enumerate(norms):
        for i, n in enumerate(p.sizes):
            by_table.setdefault((n, p.stride, p.dilation, p.pads, p.padding_mode), []).append((k, i))
    entries = [e for members in by_table.values() for e in members]
    width = max(p.groups for p in norms)
    estarts = list(itertools.accumulate((norms[k].groups for k, _ in entries), initial=0))
    tables, e = [], 0
    for members in by_table.values():
        tables.append((members[0], slice(estarts[e], estarts[e + len(members)]), slice(e, e + len(members))))
        e += len(members)
    in_order = entries == [(k, 0) for k in range(len(norms))]
    erows = None if in_order else torch.cat([torch.arange(norms[k].groups, device=device) + lstarts[k] for k, _ in entries])
    slots = torch.cat([torch.arange(norms[k].groups, device=device) + j * width for j, (k, _) in enumerate(entries)])
    factors = [norms[k]._grid_factors(weights[k])[i] for k, i in entries]
    sizes = max(len(p.sizes) for p in norms)
    layers = None
    if not in_order:
        place = {e: j for j, e in enumerate(entries)}
        layers = ints([place.get((k, i), -1) for k in range(len(norms)) for i in range(sizes)]).reshape(len(norms), sizes)
    return _RowBatch(tuple(tables), width, erows, slots, ints(estarts[:-1]), ints([lstarts[k] for k, _ in entries]),
                     None if all(f == 1.0 for f in factors) else torch.stack(
                         [torch.full((), f, dtype=weights[0].dtype, device=device) for f in factors]), layers)


@torch.no_grad()
def _row_bounds_many(norms: Sequence[ConvNormalization], weights: Sequence[torch.Tensor],
                     gradient: bool) -> list[TrainBound]:
    """The training bounds of layers bounded from cosine tables at every input size (one-row or
    one-column blocks: depthwise convs), whose kernels have the same rows and taps per group; one
    layer or many (a batched forward), each at one size or several.

    Per group, the peak of the power spectrum P(f) = sum_r k_r^T C(f) k_r, with C(f) the cosine
    matrix of the tap offsets: the groups' gram vectors of all layers in one tensor, one pair of
    matmuls per distinct cosine table. Each (layer, size)'s peak group and frequency, then each
    layer's largest over its sizes, are found on the device, and the gradient comes in closed
    form, d (c sqrt(P)) / d k_r = c^2 C(f*) k_r / value at the peak f* (C is symmetric), sitting
    in the peak's group. No autograd graph: the backward is :class:`Rescale`'s."""
    first = weights[0]
    taps = math.prod(first.shape[2:])
    kernels = torch.cat([w.reshape(p.groups, -1, taps) for p, w in zip(norms, weights)]) if len(norms) > 1 else \
        first.reshape(norms[0].groups, -1, taps)  # (sum G, rows, taps)
    rows = kernels.shape[1]
    outer = kernels.unsqueeze(-1) * kernels.unsqueeze(-2)  # tiny batched matmuls are slow on CPU
    gram = (outer[:, 0] if rows == 1 else outer.sum(1)).reshape(kernels.shape[0], -1)
    batch = _row_batch(norms, weights)
    if batch.erows is not None:
        gram = gram.index_select(0, batch.erows)
    found = [((gram[g] @ pairs) @ cosines.T).max(1)  # per group: its largest power and frequency
             for pairs, cosines, g in ((*norms[k]._tables(i, first.dtype), g) for (k, i), g, _ in batch.tables)]
    peaks, where = (found[0] if len(found) == 1 else (torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])))
    entries = batch.starts.shape[0]
    padded = peaks.new_full((entries * batch.width,), -math.inf).index_copy_(0, batch.slots, peaks)
    best = padded.reshape(entries, batch.width).argmax(1)  # each entry's peak group, on the device
    at = best + batch.starts
    values = peaks.index_select(0, at).clamp_min(0).sqrt()
    if batch.factors is not None:
        values = values * batch.factors
    right = None
    if gradient:
        freqs = where.index_select(0, at)
        cos = [cosines.index_select(0, freqs[e]) @ pairs.T  # (entries of the table, taps^2)
               for pairs, cosines, e in ((*norms[k]._tables(i, first.dtype), e) for (k, i), _, e in batch.tables)]
        cos = (cos[0] if len(cos) == 1 else torch.cat(cos)).reshape(entries, taps, taps)
        safe = values.clamp_min(torch.finfo(first.dtype).tiny)
        scale = safe.reciprocal() if batch.factors is None else batch.factors.square() / safe
        right = kernels.index_select(0, best + batch.rows).bmm(cos) * scale.reshape(-1, 1, 1)  # (entries, rows, taps)
    if batch.layers is not None:  # each layer: the largest of its entries, on the device
        valid = batch.layers >= 0
        index = batch.layers.clamp_min(0)
        pick = torch.where(valid, values.index_select(0, index.reshape(-1)).reshape(index.shape), -math.inf).argmax(1)
        chosen = index.gather(1, pick.unsqueeze(1)).squeeze(1)
        values, best = values.index_select(0, chosen), best.index_select(0, chosen)
        right = None if right is None else right.index_select(0, chosen)
    if not gradient:
        return [TrainBound(v, None) for v in values.unbind()]
    return [TrainBound(v, BlockGradient(g if p.groups > 1 else 0, p._identity(rows, first), r))
            for p, v, g, r in zip(norms, values.unbind(), best.unbind(), right.unbind())]


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

