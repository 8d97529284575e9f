"""``W * scale / bound`` with the bound computed outside autograd and its gradient in closed form.

The training bound's gradient (docs/math.md, section 7) is a rank-r block at the argmax
(:class:`~lipfx.norms.training.BlockGradient`); one hand-written backward applies it, so the
normalization adds a handful of small kernels per layer to a training step.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from ..norms.training import BlockGradient


class TrainBound(NamedTuple):
    """A training-mode bound: its value and, when asked for, its gradient."""

    value: float
    gradient: Optional[BlockGradient]


class Rescale(torch.autograd.Function):
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
