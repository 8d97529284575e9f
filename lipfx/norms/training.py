"""Conv-norm bounds for training-time normalization, computed without reading a value on the host
(docs/math.md, section 7).

The certificate path (:mod:`lipfx.norms.conv`) works in float64 and proves its results. During
training the normalized weight is ``W * K / bound(W)``, recomputed every step, so this module
evaluates the same circulant-embedding bound in the weight's dtype (float32 at least), on the
smallest grid that embeds the conv, with device-side control flow only (index tensors, fixed
step counts):

- :func:`row_spectrum`: the power spectrum of one-row/one-column blocks (depthwise convs) by two
  matmuls with a cosine table, differentiable as it is;
- :func:`block_at`: any blocks, rebuilt from the kernel for given (device) indices, with autograd;
- :func:`block_power_steps`: warm power steps on many dense blocks at once;
- :func:`tap_drift`: how far any block norm can move when the kernel changes (the slack of a
  sweep).

Blocks are indexed group-major over the half spectrum (``Grid.frequencies``), as ``rfftn`` of
the phase-stacked kernel lays them out (tests/reference.py: ``spectrum_blocks``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import torch

from .conv import zero_padded_grid
from .geometry import ConvGeometry, padding_norm
from .spectral import half_spectrum


class BlockGradient(NamedTuple):
    """The gradient of a layer's training bound with respect to its weight, factored: zero
    except in row-group ``group`` of ``weight.reshape(-1, rows, cols)``, where it is
    ``left @ right`` (``left``: rows x r, ``right``: r x cols). ``group`` is an int or a 0-d
    index tensor (an on-device argmax, never read on the host)."""

    group: Union[int, torch.Tensor]
    left: torch.Tensor
    right: torch.Tensor


class Grid(NamedTuple):
    """Where a conv's training bound is taken at one input size (host-side constants only)."""

    geometry: ConvGeometry  # zero-padded: other padding modes become a valid conv of the padded input
    sub: tuple[int, ...]  # the polyphase subgrid
    factor: float  # ||P|| of the padding operator (1 for zeros)

    @property
    def frequencies(self) -> tuple[int, ...]:
        """The half spectrum's shape (one of each conjugate pair f, -f, as ``rfftn`` keeps)."""
        return tuple(self.sub[:-1]) + (self.sub[-1] // 2 + 1,)


def subgrid(geom: ConvGeometry, n: Sequence[int]) -> Grid:
    """The zero-padded geometry the bound is taken on, its polyphase subgrid, and ||P||.

    Non-zero padding modes are bounded as ||P|| times the valid conv on the padded input, as in
    :func:`conv.conv_bound`.
    """
    factor = 1.0
    if geom.padding_mode != "zeros":
        factor = padding_norm(geom.padding_mode, n, geom.pads)
        n = tuple(ni + lo + hi for ni, (lo, hi) in zip(n, geom.pads))
        geom = ConvGeometry(geom.weight, geom.groups, geom.stride, geom.dilation,
                            tuple((0, 0) for _ in geom.pads), "zeros")
    grid = zero_padded_grid(geom, n)
    return Grid(geom, tuple(m // s for m, s in zip(grid, geom.stride)), factor)


def tap_phases(geom: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tap of the (undilated) kernel, for p = dilation * t: its phase-tap position
    ``p // stride`` (taps, d) and its phase column ``p mod stride`` in :func:`phase_stack`'s order
    (taps,), both integer (a module cast never rounds them). Host-side: move them to the device once."""
    taps = torch.cartesian_prod(*(torch.arange(k) for k in geom.kernel_size)).reshape(-1, geom.ndim)
    pos = taps * torch.tensor(geom.dilation)
    stride = torch.tensor(geom.stride)
    place = torch.tensor([math.prod(geom.stride[i + 1:]) for i in range(geom.ndim)])
    return pos // stride, ((pos % stride) * place).sum(1)


def block_at(weight: torch.Tensor, groups: int, grid: Grid, index: torch.Tensor,
             steps: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Blocks ``index`` (a device tensor of flat indices, group-major over ``grid.frequencies``)
    built from ``weight`` with autograd: (*index.shape, Cout_g, Cin_g * P) complex.

    Tap t contributes exp(-2 pi i f.(p // stride) / sub) to its phase's column, the phase reduced
    exactly (:func:`phase_turns`; taps past the subgrid wrap for free). ``steps`` and ``columns``
    are :func:`tap_phases`, on the weight's device.
    """
    shape = grid.frequencies
    flat = index.reshape(-1)
    rest = flat % math.prod(shape)
    freq = []
    for size in reversed(shape):  # unravel on the device (torch.unravel_index copies from the host)
        freq.append(rest % size)
        rest = rest // size
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    angle = phase_turns(torch.stack(freq[::-1], -1), steps, grid.sub, dtype) * (-2 * math.pi)  # (n, taps)
    n, taps, phases = flat.shape[0], steps.shape[0], math.prod(grid.geometry.stride)
    m = weight.new_zeros(n, taps, phases, 2)
    rows = torch.arange(taps, device=weight.device)
    m[:, rows, columns, 0] = torch.cos(angle).to(weight.dtype)
    m[:, rows, columns, 1] = torch.sin(angle).to(weight.dtype)
    cout_g, cin_g = weight.shape[0] // groups, weight.shape[1]
    kernels = weight.reshape(groups, cout_g * cin_g, taps)
    # one group: every block reads the same kernel (a broadcast, no copies)
    kernels = kernels[0] if groups == 1 else kernels.index_select(0, flat // math.prod(shape))
    pairs = kernels @ m.reshape(n, taps, 2 * phases)  # (n, rows, 2P): Re, Im per phase
    blocks = torch.view_as_complex(pairs.reshape(n, cout_g, cin_g * phases, 2).contiguous())
    return blocks.reshape(*index.shape, cout_g, cin_g * phases)


def phase_turns(freqs: torch.Tensor, steps: torch.Tensor, sub: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """f.d / sub in turns for every pair of integer frequencies (n, dims) and offsets (t, dims):
    (n, t), each term reduced mod sub in integers first, so the value stays below ``dims``
    whatever the offsets (float32 angles of taps far apart would otherwise lose digits)."""
    turns = torch.zeros((), dtype=dtype, device=freqs.device)
    for d, m in enumerate(sub):
        turns = turns + ((freqs[:, None, d] * steps[None, :, d]) % m).to(dtype) / m
    return turns


def tap_drift(change: torch.Tensor, groups: int) -> torch.Tensor:
    """Upper bound on how much any per-frequency block norm can move when the kernel changes by
    ``change``: max over groups of sum over taps of ||change_t||_F (a 0-d tensor).

    Each block is A(f) = sum_t W_t e^{-i theta_t(f)} (phases only regroup taps), so
    ||dA(f)|| <= sum_t ||dW_t|| at every frequency, and the block norm moves by at most that.
    """
    c = change.reshape(groups, -1, math.prod(change.shape[2:]))
    return torch.linalg.vector_norm(c, dim=1).sum(1).amax()


def row_spectrum_basis(grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side constants for :func:`row_spectrum`: (pairs (taps^2, D), cosines (D, F)), float64.

    For a block with one row (or one column), ||A(f)||^2 = sum over rows r and phases q of
    |sum_{t in q} w_rt e^{-i theta_t(f)}|^2 = sum_{t, t' in one phase} O[t, t'] cos(theta_t(f) -
    theta_t'(f)), with O = W^T W over the group's rows. The phase difference depends only on the
    offset d = (p_t - p_t') // stride (and d, -d give the same cosine), so O is summed per offset
    up to sign (``pairs``) and the spectrum is one matmul with cos(2 pi f.d / sub) over the D offsets.
    """
    steps, columns = tap_phases(grid.geometry)
    diff = (steps[:, None, :] - steps[None, :, :]).reshape(-1, steps.shape[1])
    # d and -d have the same cosine and O is symmetric: keep one of each pair (about half the table)
    first = diff[torch.arange(diff.shape[0]), (diff != 0).to(torch.int8).argmax(1)]
    diff = torch.where((first < 0)[:, None], -diff, diff)
    same = (columns[:, None] == columns[None, :]).reshape(-1)
    offsets, index = torch.unique(diff, dim=0, return_inverse=True)
    pairs = torch.zeros(diff.shape[0], offsets.shape[0], dtype=torch.float64)
    pairs[torch.arange(diff.shape[0]), index] = same.to(torch.float64)
    turns = phase_turns(half_spectrum(grid.sub), offsets, grid.sub, torch.float64)  # (F, D)
    return pairs, torch.cos(-2 * math.pi * turns.T)


def row_spectrum(weight: torch.Tensor, groups: int, pairs: torch.Tensor, cosines: torch.Tensor) -> torch.Tensor:
    """||A(f)||^2 of every one-row/one-column block, (groups * F,) in :func:`block_at`'s order,
    by two matmuls (no FFT; see :func:`row_spectrum_basis`)."""
    w = weight.reshape(groups, -1, math.prod(weight.shape[2:]))
    gram = (w.mT @ w).reshape(groups, -1)  # (G, taps^2)
    return ((gram @ pairs) @ cosines).reshape(-1)


ROW_BASIS_LIMIT = 1 << 22  # cosine-table entries per input size beyond which the spectrum is swept
SWEEP_BUDGET = 1 << 17  # elements a swept conv's per-step block evaluation may allocate
SWEEP_TOP = 4  # 1/SWEEP_TOP of a step's swept blocks are those with the largest bounds (the rest in turn)


def row_basis_size(grid: Grid) -> int:
    """Entries of :func:`row_spectrum_basis`'s cosine table: offsets (at most) x frequencies."""
    geom = grid.geometry
    kq = [math.ceil((d * (k - 1) + 1) / s) for k, d, s in zip(geom.kernel_size, geom.dilation, geom.stride)]
    return (math.prod(2 * k - 1 for k in kq) + 1) // 2 * math.prod(grid.frequencies)


@torch.no_grad()
def block_power_steps(blocks: torch.Tensor, vectors: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` power steps v <- A^H A v / ||.|| on every block (B, m, n) from ``vectors``
    (B, n), then ||A v|| lifted by the relative residual r = ||A^H A v - s^2 v|| / s^2 of the
    last vector: s sqrt(1 + r) is the top of the interval that holds an eigenvalue of A^H A
    (docs/math.md 5.2), so a vector that lags behind a moved kernel raises the value instead of
    letting it fall short. Returns (the following iterate: the warm start for the next call, the
    lifted values)."""
    v = vectors
    tiny = torch.finfo(blocks.real.dtype).tiny
    for _ in range(steps):
        y = (blocks.mH @ (blocks @ v.unsqueeze(-1))).squeeze(-1)
        norm = complex_norm(y, keepdim=True)
        v = torch.where(norm > 0, y / norm.clamp_min(tiny), v)  # a zero block keeps its vector
    x = blocks @ v.unsqueeze(-1)
    sigma = complex_norm(x.squeeze(-1), keepdim=True)
    y = (blocks.mH @ x).squeeze(-1)  # A^H A v
    square = sigma.square().clamp_min(tiny)
    residual = complex_norm(y - square * v, keepdim=True) / square
    norm = complex_norm(y, keepdim=True)
    nxt = torch.where(norm > 0, y / norm.clamp_min(tiny), v)
    return nxt, (sigma * torch.sqrt(1 + residual)).squeeze(-1)


def complex_norm(z: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The 2-norm over the last dim of a complex tensor, through its real view (vector_norm of a
    complex tensor is ~25x slower on CPU)."""
    out = torch.view_as_real(z).square().sum((-2, -1)).sqrt()
    return out.unsqueeze(-1) if keepdim else out


@torch.no_grad()
def top_vectors(blocks: torch.Tensor) -> torch.Tensor:
    """The exact top right singular vector of every block (B, m, n) -> (B, n): a warm start
    (an eigendecomposition of the smaller Gram matrix; at construction only, never per step)."""
    if blocks.shape[-1] <= blocks.shape[-2]:
        return torch.linalg.eigh(blocks.mH @ blocks)[1][..., -1]
    u = torch.linalg.eigh(blocks @ blocks.mH)[1][..., -1:]
    v = (blocks.mH @ u).squeeze(-1)
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.real.dtype).tiny)
