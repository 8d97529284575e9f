"""Per-op rules of the certificate against independent references.

Activation constants against the numerically maximised derivative; fixed linear ops (pooling,
interpolation, padding, shape ops) against the dense SVD of their real matrix.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipfx
from reference import dense_norm

MAT = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
GRID = torch.linspace(-12, 12, 2_400_001, dtype=torch.float64)


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def max_derivative(fn) -> float:
    x = GRID.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return float(g.abs().max())


ACTIVATIONS = [
    (nn.ReLU(), torch.relu), (nn.ReLU6(), F.relu6), (nn.Tanh(), torch.tanh), (nn.Sigmoid(), torch.sigmoid),
    (nn.GELU(), F.gelu), (nn.GELU(approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
    (nn.SiLU(), F.silu), (nn.Hardswish(), F.hardswish), (nn.Hardsigmoid(), F.hardsigmoid),
    (nn.ELU(), F.elu), (nn.ELU(alpha=2.5), lambda t: F.elu(t, alpha=2.5)), (nn.SELU(), F.selu),
    (nn.Mish(), F.mish),
    (nn.LeakyReLU(0.2), lambda t: F.leaky_relu(t, 0.2)), (nn.LeakyReLU(-3.0), None), (nn.CELU(0.5), None),
    (nn.Softsign(), F.softsign), (nn.LogSigmoid(), F.logsigmoid), (nn.Tanhshrink(), F.tanhshrink),
    (nn.Hardtanh(), F.hardtanh),
]


@pytest.mark.parametrize("module,functional", ACTIVATIONS, ids=[type(m).__name__ for m, _ in ACTIVATIONS])
def test_activation_constant_is_the_max_derivative(module, functional):
    true = max_derivative(module)
    x = torch.zeros(1, 8, dtype=torch.float64)
    for net in [nn.Sequential(module)] + ([Fn(functional)] if functional is not None else []):
        bound = lipfx.certificate(net, x).bound
        assert bound >= true, (module, bound, true)
        assert bound <= true * (1 + 1e-4), (module, bound, true)  # tight, not just sound


@pytest.mark.parametrize("net,reason", [
    (nn.Softplus(), "jumps by 2.06e-09"), (Fn(lambda t: F.softplus(t, beta=3.0, threshold=1.0)), "jumps by"),
    (nn.CELU(-1.0), "alpha"), (Fn(lambda t: F.celu(t, alpha=-0.5)), "alpha"),
])
def test_discontinuous_or_non_lipschitz_activations_are_unbounded(net, reason):
    x = torch.zeros(1, 8, dtype=torch.float64)
    cert = lipfx.certificate(net, x)
    assert math.isinf(cert.bound) and reason in cert.unbounded[0].reason
    # and really so: torch's softplus jumps at beta x = threshold; CELU with alpha < 0 has slope
    # exp(x / alpha) -> inf as x -> -inf
    if isinstance(net, nn.Softplus):
        t = torch.tensor([20.0 - 1e-12, 20.0 + 1e-12], dtype=torch.float64)
        assert float(net(t)[0] - net(t)[1]) > 1e-9
    if isinstance(net, nn.CELU):
        t = torch.tensor([-30.0, -30.0 - 1e-6], dtype=torch.float64)
        assert float((net(t)[0] - net(t)[1]).abs()) / 1e-6 > 1e6


def test_softmax_constant_one_half():
    # ||diag(p) - p p^T||: random logits and gradient ascent never exceed 1/2 and get close to it
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(256, 6, dtype=torch.float64, generator=gen).mul(3).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    best = 0.0
    for _ in range(100):
        p = torch.softmax(z, -1)
        jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        norms = torch.linalg.matrix_norm(jac, ord=2)
        best = max(best, float(norms.detach().max()))
        opt.zero_grad()
        (-norms.sum()).backward()
        opt.step()
    bound = lipfx.certificate(nn.Softmax(dim=-1), torch.zeros(1, 6)).bound
    assert best <= bound == 0.5
    assert best >= 0.49


def test_log_softmax_bound_is_sound():
    from empirical import empirical_lipschitz

    bound = lipfx.certificate(nn.LogSoftmax(dim=-1), torch.zeros(1, 5)).bound
    assert empirical_lipschitz(nn.LogSoftmax(dim=-1), (1, 5), starts=4) <= bound
    # tight: at nearly one-hot p the Jacobian I - 1 p^T has norm -> sqrt(n)
    z = torch.tensor([[30.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(nn.LogSoftmax(dim=-1), z).reshape(5, 5)
    attained = float(torch.linalg.matrix_norm(jac, ord=2))
    assert attained <= bound <= attained * (1 + 1e-6) and bound == pytest.approx(math.sqrt(5))


LINEAR_OPS = [
    (nn.AvgPool2d(2), (2, 8, 8)),
    (nn.AvgPool2d(3, stride=2, padding=1), (1, 9, 7)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 9, 7)),
    (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True), (1, 8, 8)),
    (nn.AvgPool2d(2, divisor_override=3), (1, 6, 6)),
    (nn.AvgPool1d(4, stride=3), (2, 17)),
    (nn.AvgPool3d(2), (1, 4, 4, 4)),
    (nn.AdaptiveAvgPool2d((3, 5)), (2, 7, 11)),
    (nn.AdaptiveAvgPool2d(1), (2, 6, 6)),
    (nn.Upsample(scale_factor=2), (1, 5, 5)),
    (nn.Upsample(scale_factor=1.5, mode="bilinear"), (1, 6, 4)),
    (nn.Upsample(size=(7, 9), mode="bilinear", align_corners=True), (1, 4, 5)),
    (nn.Upsample(scale_factor=2, mode="bicubic"), (1, 4, 4)),
    (nn.Upsample(scale_factor=3, mode="nearest"), (1, 3)),
    (nn.Upsample(scale_factor=2, mode="trilinear"), (1, 3, 3, 3)),
    (Fn(lambda t: F.interpolate(t, size=(5, 3), mode="area")), (1, 8, 7)),
    (nn.ReflectionPad2d((2, 1, 1, 2)), (1, 5, 5)),
    (nn.ReplicationPad1d(3), (2, 4)),
    (nn.ZeroPad2d(2), (1, 4, 4)),
    (Fn(lambda t: F.pad(t, (1, 2), mode="circular")), (1, 5)),
    (nn.PixelShuffle(2), (8, 3, 3)),
    (Fn(lambda t: t.mean(dim=(2, 3), keepdim=True)), (3, 4, 5)),
    (Fn(lambda t: t.sum(dim=1)), (3, 4, 5)),
    (Fn(lambda t: t.expand(-1, 3, -1)), (1, 4)),
    (Fn(lambda t: t[:, [0, 0, 1, 2, 2, 2]]), (3, 4)),
    (Fn(lambda t: torch.cat([t, 2 * t, t[:, :1]], dim=1)), (2, 3)),
    (Fn(lambda t: t.flatten(1).view(-1, 6, 2).transpose(1, 2)), (3, 2, 2)),
    (Fn(lambda t: t * torch.tensor([1.0, -3.0, 0.5]).view(1, 3, 1) - t / 4), (3, 5)),
    (Fn(lambda t: t + t.mean(dim=-1, keepdim=True)), (2, 6)),
    (Fn(lambda t: t @ MAT), (2, 4)),
    (Fn(lambda t: MAT @ t), (3, 5)),
    (Fn(lambda t: F.linear(t, MAT)), (2, 3)),
]


@pytest.mark.parametrize("op,shape", LINEAR_OPS, ids=[str(i) for i in range(len(LINEAR_OPS))])
def test_fixed_linear_ops_against_dense_svd(op, shape):
    op = op.double()
    true = dense_norm(op, shape)
    x = torch.randn(1, *shape, dtype=torch.float64)
    per_op = lipfx.certificate(op, x, compose_linear=False).bound  # the rule alone
    assert per_op >= true * (1 - 1e-12), (per_op, true)
    region = lipfx.certificate(op, x).bound  # dense linear region where it is small
    assert true * (1 - 1e-12) <= region <= true * (1 + 1e-6)


@pytest.mark.parametrize("op", [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 18, 20])
def test_exact_rules_are_exact(op):
    """Pooling, interpolation and padding rules are exact norms (product of 1-D matrices)."""
    module, shape = LINEAR_OPS[op]
    module = module.double()
    true = dense_norm(module, shape)
    bound = lipfx.certificate(module, torch.zeros(1, *shape, dtype=torch.float64), compose_linear=False).bound
    assert true <= bound <= true * (1 + 1e-8)


@pytest.mark.parametrize("pool,shape,m", [
    (nn.MaxPool2d(3, stride=1, padding=1), (1, 7, 7), 9),
    (nn.MaxPool2d(3, stride=2, padding=1), (1, 8, 8), 4),
    (nn.MaxPool2d(2), (1, 6, 6), 1),
    (nn.MaxPool1d(3, stride=1, dilation=2), (1, 9), 3),
    (nn.AdaptiveMaxPool2d((3, 3)), (1, 7, 7), 4),
])
def test_maxpool_bound_is_attained(pool, shape, m):
    bound = lipfx.certificate(pool, torch.zeros(1, *shape)).bound
    assert bound == pytest.approx(math.sqrt(m), rel=1e-12)
    # an input whose largest element sits at position i is the max of every window holding i:
    # there ||J|| = sqrt(windows holding i); the best i attains the bound
    n = math.prod(shape)
    best = 0.0
    for i in range(n):
        x = (1e-3 * torch.rand(n, dtype=torch.float64) - 1).index_fill(0, torch.tensor([i]), 1.0).reshape(1, *shape)
        jac = torch.func.jacrev(pool)(x).reshape(-1, n)
        best = max(best, float(torch.linalg.matrix_norm(jac, ord=2)))
    assert best == pytest.approx(bound, rel=1e-9)


def test_unknown_op_is_unbounded_and_named_until_a_rule_is_registered():
    class Weird(nn.Module):
        def forward(self, x):
            return torch.special.erf(x)

    cert = lipfx.certificate(Weird(), torch.zeros(1, 4))
    assert math.isinf(cert.bound)
    assert len(cert.unbounded) == 1 and "no Lipschitz rule" in cert.unbounded[0].reason
    assert "special_erf" in cert.unbounded[0].op or "erf" in cert.unbounded[0].op

    from lipfx.certify import Step, register_function_rule

    with lipfx.ops.scoped():  # the registration ends with the block: no rule leaks into later tests
        register_function_rule(torch.special.erf)(lambda ctx: Step.scale(2 / math.sqrt(math.pi), "erf' <= 2/sqrt(pi)"))
        assert lipfx.certificate(Weird(), torch.zeros(1, 4)).bound == pytest.approx(2 / math.sqrt(math.pi))
    assert math.isinf(lipfx.certificate(Weird(), torch.zeros(1, 4)).bound)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 1)

    def forward(self, x):
        return self.mha(x, x, x)[0]


@pytest.mark.parametrize("net,culprit", [
    (nn.LocalResponseNorm(2), "normalises by statistics"),
    (nn.Sequential(nn.Softplus()), "Softplus"),
    (Fn(lambda t: t * torch.sigmoid(t.mean(-1, keepdim=True))), "product of two input-dependent"),
    (Fn(lambda t: t / t.norm()), "division by an input-dependent"),
    (Fn(lambda t: t @ t.transpose(-1, -2)), "product of two input-dependent"),
    ("attention", "attention"),
    (nn.Dropout(0.5).train(), None),  # certified in eval mode: dropout is the identity there
])
def test_ops_without_a_global_constant_are_unbounded(net, culprit):
    x = torch.randn(1, 3, 4)
    if net == "attention":
        net = SelfAttention()
    cert = lipfx.certificate(net, x)
    if culprit is None:
        assert cert.bound == 1.0
        return
    assert math.isinf(cert.bound)
    assert any(culprit in c.reason or culprit in c.op for c in cert.unbounded), cert.unbounded
