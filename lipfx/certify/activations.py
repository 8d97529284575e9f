"""Elementwise activations and softmax: their Lipschitz constants max |sigma'| (MATH section 8).

Each constant is the numerically maximised derivative rounded *up*
(tests/test_certify_rules.py re-derives every one).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .registry import NodeContext, Step, Unbounded, register_function_rule, register_method_rule, register_module_rule

GELU = 1.12891  # max of Phi(x) + x phi(x), at x = sqrt(2)
GELU_TANH = 1.12900  # the tanh approximation peaks slightly higher
SILU = 1.09984  # x sigmoid(x), at x ~ 2.3994
MISH = 1.08850
SELU = 1.75810  # scale * alpha, the left limit at 0
HARDSWISH = 1.5  # (2x + 3) / 6 at x -> 3
HARDSIGMOID = 0.1666667  # 1/6, rounded up: torch computes the slope as float32(1/6)
SIGMOID = 0.25
SOFTMAX = 0.5  # ||diag(p) - p p^T|| <= 1/2


def _softmax_dim_size(ctx: NodeContext, dim) -> int:
    shape = ctx.shape()
    if dim is None:
        raise Unbounded(f"{ctx.label}: softmax without an explicit dim")
    return int(shape[dim])


def _const(value: float, method: str) -> Callable[[NodeContext], Step]:
    return lambda ctx: Step.scale(value, method)


# --- modules ----------------------------------------------------------------------------------
_FIXED_MODULES = {
    (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.LogSigmoid,
     nn.Tanhshrink, nn.CELU): (1.0, "activation: max|sigma'| = 1"),
    (nn.Sigmoid,): (SIGMOID, "activation: sigmoid' <= 1/4"),
    (nn.SiLU,): (SILU, "activation: SiLU' <= 1.0998"),
    (nn.Mish,): (MISH, "activation: Mish' <= 1.0885"),
    (nn.SELU,): (SELU, "activation: SELU' <= scale*alpha"),
    (nn.Hardswish,): (HARDSWISH, "activation: Hardswish' <= 3/2"),
    (nn.Hardsigmoid,): (HARDSIGMOID, "activation: Hardsigmoid' <= 1/6"),
    (nn.Softmax, nn.Softmin, nn.Softmax2d): (SOFTMAX, "softmax: ||diag(p) - pp^T|| <= 1/2"),
}
for _types, (_value, _method) in _FIXED_MODULES.items():
    register_module_rule(*_types)(_const(_value, _method))


register_module_rule(nn.Identity)(lambda ctx: Step.scale(1.0, "identity", linear=True))


@register_module_rule(nn.GELU)
def _gelu_module(ctx: NodeContext) -> Step:
    return _gelu(ctx.module.approximate)


@register_module_rule(nn.LeakyReLU)
def _leaky_module(ctx: NodeContext) -> Step:
    return Step.scale(max(1.0, abs(ctx.module.negative_slope)), "activation: max(1, |slope|)")


@register_module_rule(nn.ELU)
def _elu_module(ctx: NodeContext) -> Step:
    return Step.scale(max(1.0, abs(ctx.module.alpha)), "activation: max(1, |alpha|)")


@register_module_rule(nn.PReLU)
def _prelu_module(ctx: NodeContext) -> Step:
    slope = float(ctx.module.weight.detach().abs().max())
    return Step.scale(max(1.0, slope), "activation: max(1, max|slope|)")


@register_module_rule(nn.LogSoftmax)
def _log_softmax_module(ctx: NodeContext) -> Step:
    return _log_softmax(ctx, ctx.module.dim)


@register_module_rule(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
def _dropout_module(ctx: NodeContext) -> Step:
    if ctx.module.training:
        raise Unbounded(f"{ctx.label}: dropout in training mode is random; certify in eval mode")
    return Step.scale(1.0, "dropout (eval): identity", linear=True)


def _gelu(approximate: str) -> Step:
    if approximate == "tanh":
        return Step.scale(GELU_TANH, "activation: GELU(tanh)' <= 1.1290")
    return Step.scale(GELU, "activation: GELU' <= 1.1289")


def _log_softmax(ctx: NodeContext, dim) -> Step:
    # Jacobian I - 1 p^T: norm <= 1 + ||1|| ||p|| <= 1 + sqrt(n)
    n = _softmax_dim_size(ctx, dim)
    return Step.scale(1.0 + math.sqrt(n), "log-softmax: ||I - 1p^T|| <= 1 + sqrt(n)")


# --- functions and methods --------------------------------------------------------------------
_ONE = "activation: max|sigma'| = 1"
_FIXED_FUNCTIONS = {
    (torch.relu, F.relu, torch.relu_, F.relu_, F.relu6, F.hardtanh, torch.tanh, F.tanh, F.softplus,
     F.softsign, F.logsigmoid, F.tanhshrink, F.celu, torch.clamp, torch.clip, torch.clamp_min,
     torch.clamp_max): (1.0, _ONE),
    (torch.sigmoid, F.sigmoid): (SIGMOID, "activation: sigmoid' <= 1/4"),
    (F.silu,): (SILU, "activation: SiLU' <= 1.0998"),
    (F.mish,): (MISH, "activation: Mish' <= 1.0885"),
    (F.selu, torch.selu): (SELU, "activation: SELU' <= scale*alpha"),
    (F.hardswish,): (HARDSWISH, "activation: Hardswish' <= 3/2"),
    (F.hardsigmoid,): (HARDSIGMOID, "activation: Hardsigmoid' <= 1/6"),
    (F.softmax, torch.softmax, F.softmin): (SOFTMAX, "softmax: ||diag(p) - pp^T|| <= 1/2"),
}
for _fns, (_value, _method) in _FIXED_FUNCTIONS.items():
    register_function_rule(*_fns)(_const(_value, _method))

_FIXED_METHODS = {
    ("relu", "relu_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max",
     "clamp_max_", "clip", "clip_"): (1.0, _ONE),
    ("sigmoid", "sigmoid_"): (SIGMOID, "activation: sigmoid' <= 1/4"),
    ("softmax",): (SOFTMAX, "softmax: ||diag(p) - pp^T|| <= 1/2"),
}
for _names, (_value, _method) in _FIXED_METHODS.items():
    register_method_rule(*_names)(_const(_value, _method))


@register_function_rule(F.gelu)
def _gelu_function(ctx: NodeContext) -> Step:
    return _gelu(ctx.arg(1, "approximate", "none"))


@register_function_rule(F.leaky_relu, F.leaky_relu_)
def _leaky_function(ctx: NodeContext) -> Step:
    return Step.scale(max(1.0, abs(ctx.arg(1, "negative_slope", 0.01))), "activation: max(1, |slope|)")


@register_function_rule(F.elu, F.elu_)
def _elu_function(ctx: NodeContext) -> Step:
    return Step.scale(max(1.0, abs(ctx.arg(1, "alpha", 1.0))), "activation: max(1, |alpha|)")


@register_function_rule(F.log_softmax, torch.log_softmax)
def _log_softmax_function(ctx: NodeContext) -> Step:
    return _log_softmax(ctx, ctx.arg(1, "dim"))


@register_method_rule("log_softmax")
def _log_softmax_method(ctx: NodeContext) -> Step:
    return _log_softmax(ctx, ctx.arg(1, "dim"))


@register_function_rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout)
def _dropout_function(ctx: NodeContext) -> Step:
    if ctx.arg(2, "train" if ctx.node.target is torch.dropout else "training", True):
        raise Unbounded(f"{ctx.label}: dropout traced in training mode is random; trace in eval mode")
    return Step.scale(1.0, "dropout (eval): identity", linear=True)
