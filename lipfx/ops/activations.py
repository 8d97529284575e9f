"""Entries for elementwise activations and softmax: their constants max |sigma'| (docs/math.md,
section 8).

Each constant is the numerically maximised derivative rounded *up*
(tests/test_certify_rules.py re-derives every one). A constant shared by a module type, its
functional form and its method is one entry with all of them as keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import Abs, BetaAbs, GroupSort, Householder, MaxMin
from .context import NodeContext, Step, Unbounded, broadcast_factor, constant
from .fuzzing import FuzzCase, apply, randn, unary
from .table import OpEntry, key_name, table

GELU = 1.12891  # max of Phi(x) + x phi(x), at x = sqrt(2)
GELU_TANH = 1.12900  # the tanh approximation peaks slightly higher
SILU = 1.09984  # x sigmoid(x), at x ~ 2.3994
MISH = 1.08850
SELU = 1.75810  # scale * alpha, the left limit at 0
HARDSWISH = 1.5  # (2x + 3) / 6 at x -> 3
HARDSIGMOID = 0.1666667  # 1/6, rounded up: torch computes the slope as float32(1/6)
SIGMOID = 0.25
SOFTMAX = 0.5  # ||diag(p) - p p^T|| <= 1/2

_ONE = "activation: max|sigma'| = 1"
_wide = unary((3, 8), (2, 3, 5, 4), scale=3.0)  # inputs spread over the activations' bends


def _one_lipschitz_cases(key, g: torch.Generator) -> list[FuzzCase]:
    name = key_name(key)
    args: tuple = ()
    if name.startswith("clamp_min"):
        args = (-0.5,)
    elif name.startswith("clamp_max"):
        args = (0.5,)
    elif name.startswith(("clamp", "clip")):
        args = (-0.5, 1.0)
    return [FuzzCase(apply(key, *args), (randn(s, g, 3.0),), f"shape {s}") for s in ((3, 8), (2, 3, 5, 4))]


def _clamp_rule(ctx: NodeContext) -> Step:
    # |clamp(x, a, b) - clamp(x', a', b')| <= max(|x - x'|, |a - a'|, |b - b'|) elementwise, and the
    # same for max/min: the arguments combine in l2, each with its broadcast copies
    out = ctx.out_shape
    factors = tuple(broadcast_factor(ctx.shape(i), out) for i in ctx.inputs)
    if len(factors) == 1:
        return Step(factors, _ONE)
    return Step(factors, "1-Lipschitz in each argument: sqrt(sum of squares)", combine="l2")


def _clamp_cases(key, g: torch.Generator) -> list[FuzzCase]:
    cases = _one_lipschitz_cases(key, g)
    name = key_name(key)
    if name in ("maximum", "minimum", "fmax", "fmin"):
        return [FuzzCase(apply(key), (randn((3, 8), g), randn((3, 8), g)), "two inputs"),
                FuzzCase(apply(key), (randn((3, 8), g), randn((8,), g)), "broadcast input"),
                FuzzCase(lambda x, c=randn((8,), g): apply(key)(x, c), (randn((3, 8), g),), "a constant")]
    if name in ("clamp", "clip", "clamp_", "clip_"):
        cases.append(FuzzCase(lambda x, lo: apply(key)(x, lo, lo + 1.0), (randn((3, 8), g), randn((3, 8), g)),
                              "input-dependent bounds"))
    return cases


def _celu_rule(ctx: NodeContext) -> Step:
    alpha = ctx.module.alpha if ctx.module is not None else ctx.arg(1, "alpha", 1.0)
    if not alpha > 0:
        # for x < 0 the slope is exp(x / alpha), unbounded when alpha < 0
        raise Unbounded(f"{ctx.label}: CELU with alpha={alpha} is not globally Lipschitz (needs alpha > 0)")
    return Step.scale(1.0, "CELU (alpha > 0): slope exp(x / alpha) <= 1")


def _softplus_rule(ctx: NodeContext) -> Step:
    m = ctx.module
    beta = m.beta if m is not None else ctx.arg(1, "beta", 1.0)
    threshold = m.threshold if m is not None else ctx.arg(2, "threshold", 20.0)
    # torch switches to x where beta x > threshold, a jump of log(1 + exp(-threshold)) / beta: the
    # function torch computes is not continuous, however small the jump (2e-9 at the default 20)
    jump = math.log1p(math.exp(-threshold)) / abs(beta) if beta else math.inf
    raise Unbounded(f"{ctx.label}: Softplus(beta={beta}, threshold={threshold}) jumps by {jump:.3g} where it "
                    "switches to the identity (beta x = threshold): not continuous, so not Lipschitz; a smooth "
                    "activation (ELU, SiLU, GELU) certifies")


def _softmax_cases(key, g: torch.Generator) -> list[FuzzCase]:
    if isinstance(key, type):
        call = apply(key) if key is nn.Softmax2d else apply(key, dim=-1)
    else:
        call = apply(key, dim=-1)
    return [FuzzCase(call, (randn((2, 3, 4, 5), g, 3.0),), "softmax over the last dim")]


def _gelu(approximate: str) -> Step:
    if approximate == "tanh":
        return Step.scale(GELU_TANH, "activation: GELU(tanh)' <= 1.1290")
    return Step.scale(GELU, "activation: GELU' <= 1.1289")


def _gelu_rule(ctx: NodeContext) -> Step:
    return _gelu(ctx.module.approximate if ctx.module is not None else ctx.arg(1, "approximate", "none"))


def _gelu_cases(key, g: torch.Generator) -> list[FuzzCase]:
    kwargs = ({"approximate": a} for a in ("none", "tanh"))
    return [FuzzCase(apply(key, **kw), (randn((3, 8), g, 3.0),), str(kw)) for kw in kwargs]


def _leaky_rule(ctx: NodeContext) -> Step:
    slope = ctx.module.negative_slope if ctx.module is not None else ctx.arg(1, "negative_slope", 0.01)
    return Step.scale(max(1.0, abs(slope)), "activation: max(1, |slope|)")


def _elu_rule(ctx: NodeContext) -> Step:
    alpha = ctx.module.alpha if ctx.module is not None else ctx.arg(1, "alpha", 1.0)
    return Step.scale(max(1.0, abs(alpha)), "activation: max(1, |alpha|)")


def _with_parameter(name: str, values: tuple) -> callable:
    def gen(key, g: torch.Generator) -> list[FuzzCase]:
        return [FuzzCase(apply(key, **{name: v}), (randn((3, 8), g, 3.0),), f"{name}={v}") for v in values]

    return gen


def _prelu_rule(ctx: NodeContext) -> Step:
    slope = float(ctx.module.weight.detach().abs().max())
    return Step.scale(max(1.0, slope), "activation: max(1, max|slope|)")


def _prelu_cases(key, g: torch.Generator) -> list[FuzzCase]:
    out = []
    for n, fill in ((1, 0.25), (3, -2.0)):
        m = nn.PReLU(n)
        with torch.no_grad():
            m.weight.fill_(fill)
        out.append(FuzzCase(m, (randn((2, 3, 4), g, 3.0),), f"PReLU({n}) slope {fill}"))
    return out


def _log_softmax_rule(ctx: NodeContext) -> Step:
    # Jacobian I - 1 p^T: ||(I - 1 p^T) v||^2 = sum_i (v_i - p.v)^2, largest with p.v at an entry
    # v_k, and sum_{i != k} (v_i - v_k)^2 <= n ||v||^2; the limit of one-hot p attains sqrt(n)
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim")
    if dim is None:
        raise Unbounded(f"{ctx.label}: softmax without an explicit dim")
    n = int(ctx.shape()[dim])
    return Step.scale(math.sqrt(n) * (1 + 1e-12), "log-softmax: ||I - 1p^T|| <= sqrt(n)")


def _log_softmax_cases(key, g: torch.Generator) -> list[FuzzCase]:
    # large logits make p nearly one-hot, where the Jacobian's norm approaches sqrt(n)
    return [FuzzCase(apply(key, dim=d), (randn((3, 8), g, scale),), f"dim={d}, logits x{scale}")
            for d, scale in ((-1, 3.0), (1, 30.0))]


def _fixed(keys: tuple, value: float, method: str, fuzz=_wide) -> OpEntry:
    return OpEntry(keys, constant(value, method), fuzz, size_free=True, doc=method)


def _gnp_cases(key, g: torch.Generator) -> list[FuzzCase]:
    # odd channel counts (a passed-through remainder) and ties broken both ways
    if key is Householder:  # angles spread over the circle, so both sides of each line are hit
        made = [Householder(8).double(), Householder(5).double()]
        for m in made:
            m.theta.data = torch.rand(m.theta.shape, generator=g, dtype=torch.float64) * 6.3 - 3.15
        return [FuzzCase(m, (randn((3, m.channels, 2), g, 2.0),), f"{m!r}") for m in made]
    made = [key()] if key is Abs else [key(), key(dim=-1)]
    if key is GroupSort:
        made.append(GroupSort(3))
    if key is BetaAbs:
        made += [BetaAbs(0.3), BetaAbs(1.0, dim=-1)]
    shapes = ((3, 8), (2, 5, 4, 3), (2, 6, 3))
    return [FuzzCase(m, (randn(s, g, 2.0),), f"{m!r} at {s}") for m in made for s in shapes]


ENTRIES = (
    _fixed((nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, torch.relu, F.relu,
            torch.relu_, F.relu6, F.hardtanh, torch.tanh, F.tanh, F.softsign, F.logsigmoid, F.tanhshrink, "relu",
            "relu_", "tanh", "tanh_"), 1.0, _ONE),
    OpEntry((torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, "clamp", "clamp_", "clamp_min", "clamp_min_",
             "clamp_max", "clamp_max_", "clip", "clip_", torch.maximum, torch.minimum, torch.fmax, torch.fmin,
             "maximum", "minimum"), _clamp_rule, _clamp_cases, size_free=True, doc="1 in each argument (l2-combined)"),
    OpEntry((nn.CELU, F.celu), _celu_rule, _with_parameter("alpha", (1.0, 0.3, 2.5)), size_free=True, doc="1 for alpha > 0"),
    OpEntry((nn.Softplus, F.softplus), _softplus_rule, lambda key, g: [], doc="unbounded: a jump at the threshold"),
    _fixed((nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_"), SIGMOID, "activation: sigmoid' <= 1/4"),
    _fixed((nn.SiLU, F.silu), SILU, "activation: SiLU' <= 1.0998"),
    _fixed((nn.Mish, F.mish), MISH, "activation: Mish' <= 1.0885"),
    _fixed((nn.SELU, F.selu, torch.selu), SELU, "activation: SELU' <= scale*alpha"),
    _fixed((nn.Hardswish, F.hardswish), HARDSWISH, "activation: Hardswish' <= 3/2"),
    _fixed((nn.Hardsigmoid, F.hardsigmoid), HARDSIGMOID, "activation: Hardsigmoid' <= 1/6"),
    _fixed((nn.Softmax, nn.Softmin, nn.Softmax2d, F.softmax, torch.softmax, F.softmin, "softmax"), SOFTMAX,
           "softmax: ||diag(p) - pp^T|| <= 1/2", _softmax_cases),
    OpEntry((nn.GELU, F.gelu), _gelu_rule, _gelu_cases, size_free=True, doc="GELU' <= 1.1289 (tanh: 1.1290)"),
    OpEntry((nn.LeakyReLU, F.leaky_relu, F.leaky_relu_), _leaky_rule,
            _with_parameter("negative_slope", (0.01, 3.0, -2.0)), size_free=True, doc="max(1, |slope|)"),
    OpEntry((nn.ELU, F.elu, F.elu_), _elu_rule, _with_parameter("alpha", (1.0, 2.5)), size_free=True, doc="max(1, |alpha|)"),
    OpEntry((nn.PReLU,), _prelu_rule, _prelu_cases, size_free=True, doc="max(1, max|slope|)"),
    OpEntry((nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax"), _log_softmax_rule,
            _log_softmax_cases, doc="sqrt(n)"),
    OpEntry((MaxMin, GroupSort, Abs, BetaAbs, Householder), constant(1.0, "GNP activation: piecewise a permutation (or signs), 1-Lipschitz"),
            _gnp_cases, size_free=True, leaf=True, doc="1 (gradient-norm-preserving)"),
)
for _entry in ENTRIES:
    table().add(_entry)
