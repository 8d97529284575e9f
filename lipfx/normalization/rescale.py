"""``W * scale / bound`` with the bound computed outside autograd and its gradient in closed form.

The training bound's gradient (docs/math.md, section 7) is a rank-r block at the argmax
(:class:`~lipfx.norms.training.BlockGradient`); one hand-written backward applies it, so the
normalization adds a handful of small kernels per layer to a training step. Every quantity stays
a device tensor (the argmax group included): nothing here waits for the device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

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
        factor = (scale / bound).to(weight.dtype)
        index = group if isinstance(group, torch.Tensor) else None
        ctx.group = None if index is not None else group
        ctx.save_for_backward(weight, scale, bound, factor, left, right, index)
        return weight * factor

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
            if g.shape[0] == 1:
                grad_w = torch.addmm(g[0], left * coef, right).mul_(c)
            else:
                grad_w = g * c
                row = index.reshape(1) if index is not None else torch.full((1,), ctx.group, device=g.device)
                grad_w.index_add_(0, row, (left * (coef * c)).matmul(right).unsqueeze(0))
            grad_w = grad_w.view(weight.shape)
        if ctx.needs_input_grad[1]:
            grad_s = (t / b).to(scale.dtype).reshape(scale.shape)
        return grad_w, grad_s, None, None, None, None
