"""Conv-norm bounds for training-time normalization, computed without reading a value on the host
(docs/math.md, section 7).

The certificate path (:mod:`lipfx.norms.conv`) works in float64 and proves its results. During
training the normalized weight is ``W * K / bound(W)``, recomputed every step, so this module
evaluates the same circulant-embedding bound over the whole spectrum in the weight's dtype (float32
at least), on the smallest grid that embeds the conv, with device-side control flow only:

- the spectrum of the phase-stacked kernel is taken outside autograd, and the block where the
  bound peaks is found with an on-device argmax;
- that one block is then rebuilt from the kernel with autograd (:func:`block_at`), so the
  gradient of the bound is the gradient at its argmax and costs a block, not a spectrum.

Blocks with one row or one column (depthwise convs) have the Frobenius norm as their exact
2-norm; dense blocks (full convs) carry one warm-started singular vector each, advanced by a fixed
number of power steps per training step.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import torch

from .conv import zero_padded_grid
from .geometry import ConvGeometry, padding_norm
from .spectral import phase_stack, transfer_matrices


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


@torch.no_grad()
def spectrum_blocks(grid: Grid) -> torch.Tensor:
    """Every per-frequency block of the phase-stacked kernel, (groups * F, Cout_g, Cin_g * P)
    complex, flattened group-major (the index :func:`block_at` takes). One of each conjugate
    pair f, -f is kept: real kernels give them equal singular values."""
    geom = grid.geometry
    stacked = phase_stack(geom.dilated_weight(), geom.groups, geom.stride)
    if any(k > m for k, m in zip(stacked.shape[3:], grid.sub)):
        spec = transfer_matrices(stacked, grid.sub)  # taps wrap around the grid: (G, *F, co, ci)
    else:  # zero padding never wraps: rfftn pads the kernel itself
        spec = torch.fft.rfftn(stacked, s=grid.sub, dim=tuple(range(3, stacked.dim())))
        spec = spec.movedim((1, 2), (-2, -1))
    return spec.reshape(-1, *spec.shape[-2:])


def tap_phases(geom: ConvGeometry, sub: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tap of the (undilated) kernel, for p = dilation * t: the phase advance per unit
    frequency, -2 pi (p // stride) / sub (taps, d), and the phase column p mod stride in
    :func:`phase_stack`'s order (taps,). Host-side constants: move them to the device once."""
    taps = torch.cartesian_prod(*(torch.arange(k) for k in geom.kernel_size)).reshape(-1, geom.ndim)
    pos = taps * torch.tensor(geom.dilation)
    stride = torch.tensor(geom.stride)
    place = torch.tensor([math.prod(geom.stride[i + 1:]) for i in range(geom.ndim)])
    rates = (pos // stride).to(torch.float64) * torch.tensor([-2 * math.pi / m for m in sub], dtype=torch.float64)
    return rates, ((pos % stride) * place).sum(1)


def block_at(weight: torch.Tensor, groups: int, grid: Grid, index: torch.Tensor,
             rates: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Block ``index`` of :func:`spectrum_blocks` rebuilt from ``weight`` with autograd:
    (Cout_g, Cin_g * P) complex.

    Tap t contributes exp(-2 pi i f.(p // stride) / sub) to its phase's column (taps past the
    subgrid wrap, and exp is periodic, so they need nothing). ``index`` is a 0-d device tensor;
    ``rates`` and ``columns`` are :func:`tap_phases` for this grid, on the weight's device.
    """
    shape = tuple(grid.sub[:-1]) + (grid.sub[-1] // 2 + 1,)
    rest = index % math.prod(shape)
    freq = []
    for size in reversed(shape):  # unravel on the device (torch.unravel_index copies from the host)
        freq.append(rest % size)
        rest = rest // size
    angle = rates @ torch.stack(freq[::-1]).to(rates.dtype)  # (taps,)
    taps, phases = rates.shape[0], math.prod(grid.geometry.stride)
    m = weight.new_zeros(taps, phases, 2)
    rows = torch.arange(taps, device=weight.device)
    m[rows, columns, 0] = torch.cos(angle).to(weight.dtype)
    m[rows, columns, 1] = torch.sin(angle).to(weight.dtype)
    cout_g, cin_g = weight.shape[0] // groups, weight.shape[1]
    group = (index // math.prod(shape)).reshape(1)
    kernel = weight.reshape(groups, cout_g * cin_g, taps).index_select(0, group)[0]
    pairs = kernel @ m.reshape(taps, 2 * phases)  # (rows, 2P): Re, Im per phase
    return torch.view_as_complex(pairs.reshape(cout_g, cin_g * phases, 2).contiguous())


@torch.no_grad()
def block_power_steps(blocks: torch.Tensor, vectors: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` power steps v <- A^H A v / ||.|| on every block (B, m, n) from ``vectors``
    (B, n); returns (the new vectors, ||A v|| per block: estimates from below)."""
    v = vectors
    tiny = torch.finfo(blocks.real.dtype).tiny
    for _ in range(steps):
        y = (blocks.mH @ (blocks @ v.unsqueeze(-1))).squeeze(-1)
        norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        v = torch.where(norm > 0, y / norm.clamp_min(tiny), v)  # a zero block keeps its vector
    return v, torch.linalg.vector_norm((blocks @ v.unsqueeze(-1)).squeeze(-1), dim=-1)


@torch.no_grad()
def top_vectors(blocks: torch.Tensor) -> torch.Tensor:
    """The exact top right singular vector of every block (B, m, n) -> (B, n): a warm start
    (an eigendecomposition of the smaller Gram matrix; at construction only, never per step)."""
    if blocks.shape[-1] <= blocks.shape[-2]:
        return torch.linalg.eigh(blocks.mH @ blocks)[1][..., -1]
    u = torch.linalg.eigh(blocks @ blocks.mH)[1][..., -1:]
    v = (blocks.mH @ u).squeeze(-1)
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.real.dtype).tiny)
