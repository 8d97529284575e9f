"""``W * scale / bound`` with the bound computed outside autograd and its gradient in closed form.

The training bound's gradient (docs/math.md, section 7) is a rank-r block at the argmax
(:class:`~lipfx.norms.training.BlockGradient`); one hand-written backward applies it, so the
normalization adds a handful of small kernels per layer to a training step. Every quantity stays
a device tensor (the argmax group included): nothing here waits for the device.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from ..norms.training import BlockGradient


class TrainBound(NamedTuple):
    """A training-mode bound: its value (a 0-d tensor) and, when asked for, its gradient. A
    value with autograd history carries its own gradient (``gradient`` is then None)."""

    value: torch.Tensor
    gradient: Optional[BlockGradient]


class Rescale(torch.autograd.Function):
    """``weight * scale / bound`` where ``bound`` was computed outside autograd and its gradient
    ``D = left @ right`` sits in row-group ``group`` (an int, or a 0-d index tensor). For G the
    incoming gradient and t = <G, W>: dW = (scale / b) (G - (t / b) D), d scale = t / b."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor, bound: torch.Tensor,
                group: Union[int, torch.Tensor], left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        # ctx-style forward: the setup_context style binds arguments through inspect.signature
        # on every call, which costs more than the whole normalization of a small layer
        wide = scale / bound
        factor = wide.to(weight.dtype)
        index = group if isinstance(group, torch.Tensor) else None
        ctx.group = None if index is not None else group
        ctx.save_for_backward(weight, scale, bound, factor, left, right, index)
        return scaled_weight(weight, wide)

    @staticmethod
    @once_differentiable  # the bound's gradient is first-order only; a double backward raises
    def backward(ctx, grad_out: torch.Tensor):
        weight, scale, b, c, left, right, index = ctx.saved_tensors
        t = torch.dot(grad_out.reshape(-1), weight.reshape(-1)).to(b.dtype)
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            # c (G - (t / b) D), in as few passes over G as the groups allow (large pointwise
            # and linear weights make a training step memory-bound here)
            g = grad_out.reshape(-1, left.shape[0], right.shape[1])
            coef = (-t / b).to(g.dtype)
            left, right = left.to(g.dtype), right.to(g.dtype)
            if g.shape[0] == 1:  # c G, then the rank-r term in place: two passes over G, not three
                grad_w = torch.mul(g[0], c).addmm_(left * (coef * c), right)
            else:
                grad_w = g * c
                row = index.reshape(1) if index is not None else torch.full((1,), ctx.group, device=g.device)
                grad_w.index_add_(0, row, (left * (coef * c)).matmul(right).unsqueeze(0))
            grad_w = grad_w.view(weight.shape)
        if ctx.needs_input_grad[1]:
            grad_s = (t / b).to(scale.dtype).reshape(scale.shape)
        return grad_w, grad_s, None, None, None, None


class RescaleMany(torch.autograd.Function):
    """:class:`Rescale` of many weights in one autograd node, each with its bound's gradient
    ``left @ right`` in row-group ``groups[i]`` (an int or a 0-d index tensor, as in Rescale):
    the forward is one foreach product and the backward does per weight only its passes over the
    incoming gradient (the dot product t and the rank-r update), the rest in foreach kernels.

    ``RescaleMany.apply(n, groups, *weights, *scales, *bounds, *lefts, *rights)`` returns the n weights."""

    @staticmethod
    def forward(ctx, n: int, groups: Sequence[Union[int, torch.Tensor]], *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights, scales, bounds = args[:n], args[n:2 * n], args[2 * n:3 * n]
        wide = torch._foreach_div(list(scales), list(bounds))
        factors = [f.to(w.dtype) for f, w in zip(wide, weights)]
        ctx.n, ctx.groups = n, tuple(groups)
        ctx.save_for_backward(*args, *factors)
        ctx.set_materialize_grads(False)  # an unused weight's gradient stays None: skipped
        if any(compute_dtype(w) != w.dtype for w in weights):  # half precision: rounded once, as in Rescale
            return tuple(scaled_weight(w, f) for w, f in zip(weights, wide))
        return tuple(torch._foreach_mul(list(weights), factors))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[torch.Tensor]):
        n, saved = ctx.n, ctx.saved_tensors
        weights, scales, bounds, lefts, rights, factors = (saved[i * n:(i + 1) * n] for i in range(6))
        grad_w: list = [None] * n
        grad_s: list = [None] * n
        live = [i for i in range(n) if grads[i] is not None]
        if live:
            ts = [torch.dot(grads[i].reshape(-1), weights[i].reshape(-1)).to(bounds[i].dtype) for i in live]
            ratios = torch._foreach_div(ts, [bounds[i] for i in live])  # t / b
            wanted = [k for k, i in enumerate(live) if ctx.needs_input_grad[2 + i]]
            if wanted:
                idx = [live[k] for k in wanted]
                scaled = torch._foreach_mul([grads[i].contiguous() for i in idx], [factors[i] for i in idx])  # c G
                for g, k, i in zip(scaled, wanted, idx):  # - c (t / b) D, in place, rounded as Rescale does
                    left, right = lefts[i].to(g.dtype), rights[i].to(g.dtype)
                    update = left * ((-ratios[k]).to(g.dtype) * factors[i])
                    blocks = g.view(-1, left.shape[0], right.shape[1])
                    if blocks.shape[0] == 1:
                        blocks[0].addmm_(update, right)
                    else:
                        group = ctx.groups[i]
                        row = group.reshape(1) if isinstance(group, torch.Tensor) else torch.full((1,), group, device=g.device)
                        blocks.index_add_(0, row, update.matmul(right).unsqueeze(0))
                    grad_w[i] = g
            for k, i in enumerate(live):
                if ctx.needs_input_grad[2 + n + i]:
                    grad_s[i] = ratios[k].to(scales[i].dtype).reshape(scales[i].shape)
        return (None, None, *grad_w, *grad_s, *([None] * (3 * n)))


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype training bounds are computed in: the weight's, and never below float32."""
    return torch.promote_types(weight.dtype, torch.float32)


def scaled_weight(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``weight * factor``, taken in :func:`compute_dtype` and rounded once: for a bf16 or fp16
    weight, rounding the factor to its dtype first and then the product put the layer's norm
    up to 1.004 K (two roundings of 2^-8 each); one rounding leaves at most one."""
    wide = compute_dtype(weight)
    return (weight.to(wide) * factor.to(wide)).to(weight.dtype)


def bound_floor(dtype: torch.dtype) -> float:
    """The smallest bound a training step divides by: sqrt(tiny) * 2^24 (1.8e-12 in float32).
    Below it the squares that norms and power steps sum underflow (a float32 layer with entries
    near 1e-20 had its norm estimated at a tenth of the truth), so smaller estimates are noise;
    dividing by the floor instead is sound (the layer's norm is then K * norm / floor < K) and
    keeps a zero layer's gradient finite."""
    return math.sqrt(torch.finfo(dtype).tiny) * 2.0 ** 24


def rescaled(weight: torch.Tensor, scale: torch.Tensor, bound: TrainBound, needs_grad: bool) -> torch.Tensor:
    """``weight * scale / bound``, the bound at least :func:`bound_floor`; through
    :class:`Rescale` when gradients are wanted and the bound brought its own (else autograd, if
    any, goes through the bound's value)."""
    floor = bound_floor(bound.value.dtype)
    value = bound.value.clamp_min(floor)
    if not needs_grad or bound.gradient is None:
        return scaled_weight(weight, scale / value)
    g = bound.gradient
    return Rescale.apply(weight, scale, value, g.group, floor_masked(g.left, bound.value, floor), g.right)


def rescaled_many(weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                  bounds: Sequence[TrainBound]) -> list[torch.Tensor]:
    """:func:`rescaled` of many weights whose bounds bring their gradients (factored, not
    through autograd): those that want gradients through one :class:`RescaleMany` node, the
    others as plain products."""
    grad = torch.is_grad_enabled()
    live = [i for i, (w, s) in enumerate(zip(weights, scales)) if grad and (w.requires_grad or s.requires_grad)]
    wanted = set(live)
    out = [None if i in wanted else rescaled(w, s, b, False) for i, (w, s, b) in enumerate(zip(weights, scales, bounds))]
    if live:
        floor = bound_floor(bounds[live[0]].value.dtype)
        values = torch._foreach_clamp_min([bounds[i].value for i in live], floor)
        lefts = [floor_masked(bounds[i].gradient.left, bounds[i].value, floor) for i in live]
        args = ([weights[i] for i in live] + [scales[i] for i in live] + list(values)
                + lefts + [bounds[i].gradient.right for i in live])
        groups = [bounds[i].gradient.group for i in live]
        for i, w in zip(live, RescaleMany.apply(len(live), groups, *args)):
            out[i] = w
    return out


def floor_masked(left: torch.Tensor, value: torch.Tensor, floor: float) -> torch.Tensor:
    """The gradient factor of max(value, floor): 0 where the floor holds (the estimate below it
    is noise, its lift and vectors too)."""
    return left * (value > floor).to(left.dtype)
