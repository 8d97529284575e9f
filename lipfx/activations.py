"""Gradient-norm-preserving (GNP) activations: 1-Lipschitz, with a Jacobian that is orthogonal
almost everywhere (docs/math.md, section 14).

ReLU halves the gradient's norm wherever it is off, so a network of norm-1 layers uses little of
its Lipschitz budget; these keep every singular value of the Jacobian at 1 (Anil et al. 2019,
GroupSort; Singla et al. and LipNeXt use MaxMin and Abs). ``lipfx.convert(..., activation=...)``
puts them in place of ReLU-like activations.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import forward_ad

from .errors import ArgumentError


class MaxMin(nn.Module):
    """Channels split in halves a, b along ``dim``: (max(a, b), min(a, b)). An odd last channel
    passes through. Piecewise a permutation of the entries, continuous: 1-Lipschitz, GNP."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return _maxmin(x, self.dim)  # TorchScript cannot hold a Python autograd.Function
        return self._routed(x)

    @torch.jit.unused
    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        # torch.func's transforms and forward-mode AD need the setup_context style with a jvp
        # (torch's own Function.apply makes the same transform check). Dynamo refuses a custom
        # jvp but traces the plain class's forward and backward itself, under a transform too;
        # with a dual level open it cannot take the plain class either, and gets the expression
        # (same values; its backward halves the gradient at ties).
        if torch.compiler.is_compiling():
            if forward_ad._current_level >= 0:
                return _maxmin(x, self.dim)
            return _MaxMinFunction.apply(x, self.dim)
        transformed = torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
        return (_MaxMinTransformable if transformed else _MaxMinFunction).apply(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _halves(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    half = x.shape[dim] // 2
    return x.narrow(dim, 0, half), x.narrow(dim, half, half), x.narrow(dim, 2 * half, x.shape[dim] - 2 * half)


def _maxmin(x: torch.Tensor, dim: int) -> torch.Tensor:
    a, b, rest = _halves(x, dim)
    return torch.cat((torch.maximum(a, b), torch.minimum(a, b), rest), dim)


def _route(t: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """(u, v, rest) -> (m u + (1 - m) v, m v + (1 - m) u, rest) for the 0/1 mask m: the JVP of
    MaxMin for a tangent, and its VJP for a gradient (the Jacobian per pair is I or the swap,
    so it is its own transpose)."""
    u, v, rest = _halves(t, dim)
    # with a 0/1 mask, u m + (v - v m) is u or v exactly for every finite pair; lerp's
    # v + m (u - v) would overflow to inf (and 0 * inf = NaN) for opposite entries near the
    # dtype's max
    um, vm = u * mask, v * mask
    return torch.cat((um + (v - vm), vm + (u - um), rest), dim)


def _mask(x: torch.Tensor, dim: int) -> torch.Tensor:
    a, b, _ = _halves(x, dim)
    return (a >= b).to(x.dtype)


class _MaxMinFunction(torch.autograd.Function):
    """MaxMin with its gradient routed by a 0/1 mask: a's gradient is the max's where a >= b and
    the min's elsewhere, b's the other one (at a tie a takes the max's: the Jacobian stays a
    permutation, where torch.maximum's backward would split the gradient in halves). The
    mask and a few products replace maximum/minimum's backward, whose where/masked_fill
    kernels measured ~4x slower on CPU (docs/benchmarks.md); the backward is itself
    differentiable. ctx-style forward: the setup_context style costs an inspect.signature
    bind per call (~15% of the whole op here), so it is kept for torch.func and forward-mode
    AD (:class:`_MaxMinTransformable`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.save_for_backward(_mask(x, dim))
        ctx.dim = dim
        return _maxmin(x, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return _route(grad, mask, ctx.dim), None


class _MaxMinTransformable(_MaxMinFunction):
    """The same function in the setup_context style, with a jvp: what torch.func's transforms
    (vmap, jacrev, jacfwd, grad) and forward-mode AD require; MaxMin picks it only while one
    is active."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, dim: int) -> torch.Tensor:  # type: ignore[override]
        return _maxmin(x, dim)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor, int], output: torch.Tensor) -> None:
        x, dim = inputs
        mask = _mask(x, dim)
        ctx.save_for_backward(mask)
        ctx.save_for_forward(mask)
        ctx.dim = dim

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _: None) -> torch.Tensor:
        (mask,) = ctx.saved_tensors
        return _route(tangent, mask, ctx.dim)


class GroupSort(nn.Module):
    """Consecutive groups of ``group_size`` entries along ``dim`` sorted in descending order (a
    remainder passes through). ``group_size=2`` is MaxMin on adjacent pairs."""

    def __init__(self, group_size: int = 2, dim: int = 1) -> None:
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ArgumentError(f"GroupSort group_size must be an int >= 2, got {group_size!r}")
        self.group_size, self.dim = group_size, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        n = x.shape[dim]
        full = n - n % self.group_size
        head = x.narrow(dim, 0, full)
        shape = head.shape[:dim] + (full // self.group_size, self.group_size) + head.shape[dim + 1:]
        ordered = head.reshape(shape).sort(dim + 1, descending=True).values.reshape(head.shape)
        return torch.cat((ordered, x.narrow(dim, full, n - full)), dim)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


class Abs(nn.Module):
    """|x|: 1-Lipschitz, its Jacobian a diagonal of signs (GNP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


class BetaAbs(nn.Module):
    """|x| on the first ``round(beta * C)`` channels along ``dim``, identity on the rest
    (LipNeXt's beta-Abs): a diagonal of signs, 1-Lipschitz, GNP. ``beta=1`` is :class:`Abs`."""

    def __init__(self, beta: float = 0.5, dim: int = 1) -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
            raise ArgumentError(f"BetaAbs beta must be a number in [0, 1], got {beta!r}")
        self.beta, self.dim = float(beta), dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.dim]
        k = round(self.beta * n)
        return torch.cat((x.narrow(self.dim, 0, k).abs(), x.narrow(self.dim, k, n - k)), self.dim)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, dim={self.dim}"


class Householder(nn.Module):
    """Channels split in halves a, b along ``dim``; each pair z = (a_c, b_c) is kept when
    <v_c, z> > 0 and reflected through the line v_c^T z = 0 otherwise, v_c = (cos t_c, sin t_c)
    learnable (Singla et al. 2022). Continuous (the reflection fixes that line), piecewise
    orthogonal: 1-Lipschitz, GNP. ``t = -pi/4`` (the initial value) is :class:`MaxMin`. ``channels``
    is the size of ``dim``; an odd last channel passes through."""

    def __init__(self, channels: int, dim: int = 1) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2:
            raise ArgumentError(f"Householder channels must be an int >= 2, got {channels!r}")
        self.channels, self.dim = channels, dim
        self.theta = nn.Parameter(torch.full((channels // 2,), -math.pi / 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] != self.channels:
            raise ArgumentError(f"Householder({self.channels}) got {x.shape[self.dim]} channels along dim {self.dim}")
        half = self.channels // 2
        # in float32 or wider: a unit vector rounded to bf16 would reflect by up to 1 + 2^-7
        wide = torch.promote_types(x.dtype, torch.float32)
        a, b, rest = _halves(x, self.dim)
        a, b = a.to(wide), b.to(wide)
        shape = [1] * x.dim()
        shape[self.dim] = half
        theta = self.theta.to(torch.promote_types(wide, self.theta.dtype)).reshape(shape)
        c, s = torch.cos(theta).to(wide), torch.sin(theta).to(wide)
        dot = c * a + s * b
        keep = dot > 0
        a = torch.where(keep, a, a - 2 * dot * c)
        b = torch.where(keep, b, b - 2 * dot * s)
        return torch.cat((a.to(x.dtype), b.to(x.dtype), rest), self.dim)

    def extra_repr(self) -> str:
        return f"{self.channels}, dim={self.dim}"


# the activations convert(activation=...) can put in place of ReLU-like ones: name -> (channels -> module)
GNP_ACTIVATIONS = {
    "maxmin": lambda channels: MaxMin(),
    "groupsort": lambda channels: GroupSort(),
    "abs": lambda channels: Abs(),
    "beta-abs": lambda channels: BetaAbs(),
    "householder": lambda channels: Householder(channels),
}
