"""Independent references for tests: true operator norms computed from the real module."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def dense_matrix(fn: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int]) -> torch.Tensor:
    """Explicit matrix of a linear map (float64), by pushing the identity basis through it."""
    n = torch.Size(input_shape).numel()
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    return fn(basis).reshape(n, -1).T


def linear_part(module: torch.nn.Module, input_shape: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> module(x) - module(0) for batched x of shape (B, *input_shape)."""
    zero = torch.zeros(1, *input_shape, dtype=torch.float64)
    offset = module(zero)
    return lambda x: module(x) - offset


def dense_norm(module: torch.nn.Module, input_shape: Sequence[int]) -> float:
    """True operator norm of a module's linear part by dense SVD (tiny sizes only)."""
    with torch.no_grad():
        matrix = dense_matrix(linear_part(module, input_shape), input_shape)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


@torch.no_grad()
def spectrum_blocks(grid) -> torch.Tensor:
    """Every per-frequency block of a conv's phase-stacked kernel by ``rfftn`` (or the wrapped
    transfer matrices), (groups * F, Cout_g, Cin_g * P) complex, group-major over the half
    spectrum: the layout lipfx.norms.training builds block by block. ``grid``: its ``subgrid``."""
    from lipfx.norms.spectral import phase_stack, transfer_matrices

    geom = grid.geometry
    stacked = phase_stack(geom.dilated_weight(), geom.groups, geom.stride)
    if any(k > m for k, m in zip(stacked.shape[3:], grid.sub)):
        spec = transfer_matrices(stacked, grid.sub)  # taps wrap around the grid: (G, *F, co, ci)
    else:  # zero padding never wraps: rfftn pads the kernel itself
        spec = torch.fft.rfftn(stacked, s=grid.sub, dim=tuple(range(3, stacked.dim())))
        spec = spec.movedim((1, 2), (-2, -1))
    return spec.reshape(-1, *spec.shape[-2:])
