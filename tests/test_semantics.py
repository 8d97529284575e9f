"""The certificate models what ops do to values: casts, detach, aliasing, indices, statistics
normalisers, shape-only arguments, tiny weights, stale caches, BatchNorm folding. Each case is
checked against an independent reference computed from values (dense matrices built by forward
evaluation, secant quotients, Jacobians at the worst-case inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipfx
from lipfx.ops.fuzzing import Probe as Fn, Probe2 as TwoInputs, secant_lower_bound
from reference import dense_matrix


def _dense(fn, shape) -> float:
    zero = fn(torch.zeros(1, *shape, dtype=torch.float64))
    m = dense_matrix(lambda x: torch.stack([fn(b.unsqueeze(0)) - zero for b in x]).squeeze(1), shape)
    return float(torch.linalg.matrix_norm(m, ord=2))


# --- the semantic model: values, not autograd or names -------------------------------------------
@pytest.mark.parametrize("fn,what", [
    (lambda t: t.to(torch.int64).double(), "int64"),
    (lambda t: t.to(torch.bool).double(), "bool"),
    (lambda t: (t > 0).double() * t, "bool"),
    (lambda t: t.argmax(-1).double(), "int64"),
    (lambda t: torch.max(t, -1)[1].double(), "int64"),
])
def test_integer_and_bool_values_are_unbounded(fn, what):
    cert = lipfx.certificate(Fn(fn), torch.randn(2, 4, dtype=torch.float64))
    assert math.isinf(cert.bound) and any(what in c.reason for c in cert.unbounded), cert.unbounded


def test_float_casts_are_the_identity():
    x = torch.randn(2, 4, dtype=torch.float64)
    assert lipfx.certificate(Fn(lambda t: t.float().double() * 3), x).bound == pytest.approx(3.0)


@pytest.mark.parametrize("fn,true", [
    (lambda z: z + (10 * z - z).detach(), 10.0),          # the detached path is still in the values
    (lambda z: torch.cat([z, (3 * z).detach()], 1), math.sqrt(10.0)),
])
def test_detach_is_the_identity_on_values(fn, true):
    x = torch.randn(1, 4, dtype=torch.float64)
    cert = lipfx.certificate(Fn(fn), x)
    assert _dense(fn, (4,)) == pytest.approx(true, rel=1e-9)
    assert true <= cert.bound <= true * (1 + 1e-6)


# --- aliasing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [
    lambda t: (lambda h: h.mul_(3) + h)(t * 1.0),                   # two readers of a mutated tensor
    lambda t: (lambda h: (h.mul_(3), t + h)[1])(t),                # the input itself, read after
    lambda t: (lambda h: (lambda v: (h.mul_(3), v * 1)[1])(h.view(-1)))(t * 1.0),  # a view read after
    lambda t: (lambda h: (F.relu(h, inplace=True), h * 2)[1])(t - 1.0),
    lambda t: (lambda h: (h.__setitem__(0, t[0] * 5), h + 1)[1])(t * 1.0),  # x[i] = y, then x read
])
def test_inplace_writes_seen_by_later_readers_are_refused(fn):
    x = torch.randn(2, 4, dtype=torch.float64)
    cert = lipfx.certificate(Fn(fn), x)
    assert math.isinf(cert.bound) and any("aliasing" in c.reason for c in cert.unbounded), cert.unbounded


def test_inplace_ops_without_later_readers_certify_like_their_out_of_place_twins():
    x = torch.randn(2, 4, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4)).double()
    plain = nn.Sequential(net[0], nn.ReLU(), net[2])
    assert lipfx.certificate(net, x).bound == pytest.approx(lipfx.certificate(plain, x).bound, rel=1e-12)
    twice = Fn(lambda t: (t * 2).mul_(3))
    assert lipfx.certificate(twice, x).bound == pytest.approx(6.0)
    assert secant_lower_bound(twice, (x,), torch.Generator().manual_seed(0)) == pytest.approx(6.0)


# --- indices -------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [
    (slice(None), [3, -1]), (slice(None), [[0, -4], [1, 0]]), (slice(None), torch.tensor([-1, 3, 3])),
    (Ellipsis, slice(-3, None)), ([0, -2], [1, 1]),
])
def test_indexing_counts_repeated_elements_whatever_the_index_form(index):
    shape = (2, 4)
    fn = Fn(lambda t: t[index])
    x = torch.randn(*shape, dtype=torch.float64)
    # the map of the whole (2, 4) tensor (the index may select along the batch dim too)
    m = dense_matrix(lambda b: torch.stack([v[index].reshape(-1) for v in b]), shape)
    true = float(torch.linalg.matrix_norm(m, ord=2))
    bound = lipfx.certificate(fn, x).bound
    assert true * (1 - 1e-12) <= bound <= true * (1 + 1e-9), (bound, true)  # (the SVD rounds too)


# --- statistics normalisers: max|gamma| / sqrt(eps), attained at constant inputs -------------------
@pytest.mark.parametrize("make,shape", [
    (lambda: nn.LayerNorm(6, eps=1e-3), (2, 6)),
    (lambda: nn.GroupNorm(2, 4, eps=1e-3), (1, 4, 3)),
    (lambda: nn.InstanceNorm1d(3, eps=1e-3, affine=True), (1, 3, 5)),
    (lambda: nn.RMSNorm(6, eps=1e-3), (2, 6)),
    (lambda: Fn(lambda t: F.layer_norm(t, (6,), torch.full((6,), -2.0, dtype=torch.float64), None, 1e-3)), (2, 6)),
])
def test_statistics_normalisers_have_their_exact_constant(make, shape):
    m = make().double().eval()
    gamma = 1.0
    if getattr(m, "weight", None) is not None:
        with torch.no_grad():
            m.weight.fill_(1.7)
        gamma = 1.7
    elif isinstance(m, Fn):
        gamma = 2.0
    bound = lipfx.certificate(m, torch.randn(*shape, dtype=torch.float64)).bound
    # the Jacobian at a constant input (zero variance; for RMSNorm, zero) attains gamma / sqrt(eps)
    x0 = torch.zeros(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(m, x0).reshape(math.prod(shape), math.prod(shape))
    attained = float(torch.linalg.matrix_norm(jac, ord=2))
    assert attained == pytest.approx(gamma / math.sqrt(1e-3), rel=1e-6)
    assert attained <= bound <= attained * (1 + 1e-6)
    # and at random inputs it is smaller
    for s in range(3):
        x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
        jac = torch.autograd.functional.jacobian(m, x).reshape(math.prod(shape), math.prod(shape))
        assert float(torch.linalg.matrix_norm(jac, ord=2)) <= bound


# --- shape-only arguments and new 1-Lipschitz ops ------------------------------------------------
@pytest.mark.parametrize("fn,true", [
    (lambda x, y: x.view_as(y) * 2, 2.0),
    (lambda x, y: x.reshape_as(y) + 0 * y, 1.0),
    (lambda x, y: x[:, :1].expand_as(y), 2.0),
    (lambda x, y: x.type_as(y), 1.0),
])
def test_shape_only_arguments_contribute_nothing(fn, true):
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    bound = lipfx.certificate(TwoInputs(fn), (x, y)).bound
    assert true <= bound <= true * (1 + 1e-9)


@pytest.mark.parametrize("fn", [
    lambda x, y: torch.clamp(x, min=y), lambda x, y: torch.maximum(x, y), lambda x, y: torch.minimum(x, 2 * y),
    lambda x, y: x.norm(dim=1) + y.amax(1), lambda x, y: torch.max(x, 1).values - y.min(dim=1)[0],
    lambda x, y: torch.sort(x - y, dim=1).values, lambda x, y: torch.linalg.vector_norm(x, ord=1, dim=-1) * 0.5,
])
def test_one_lipschitz_ops_are_sound_and_finite(fn):
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    net = TwoInputs(fn)
    bound = lipfx.certificate(net, (x, y)).bound
    assert math.isfinite(bound)
    assert secant_lower_bound(net, (x, y), torch.Generator().manual_seed(0), pairs=60) <= bound * (1 + 1e-9)  # (FD rounding)


def test_a_bare_layer_is_certified_like_a_one_layer_network():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    bound = lipfx.certificate(conv, x).bound
    assert math.isfinite(bound) and bound == pytest.approx(lipfx.certificate(nn.Sequential(conv), x).bound)


# --- numerics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-170, 1e-300, 1e250])
def test_tiny_and_huge_weights_keep_their_bound(scale):
    torch.manual_seed(0)
    for layer, shape in [(nn.Linear(6, 5), (6,)), (nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6)),
                         (nn.Conv2d(3, 3, 3, groups=3, stride=2), (3, 7, 7))]:
        layer = layer.double()
        reference = lipfx.layer_bound(layer, shape)
        with torch.no_grad():
            layer.weight.mul_(scale)
        got = lipfx.layer_bound(layer, shape) / scale
        assert got == pytest.approx(reference, rel=1e-9), (layer, got, reference)
        assert lipfx.layer_bound(layer, None) / scale == pytest.approx(
            lipfx.layer_bound(layer.double(), None) / scale, rel=1e-9)


# --- the eval-mode cache never outlives the weight ------------------------------------------------
@pytest.mark.parametrize("write", ["data", "no_grad", "load_state_dict", "optimizer"])
def test_eval_cache_follows_every_kind_of_weight_write(write):
    torch.manual_seed(0)
    x = torch.randn(1, 4)
    net = lipfx.convert(nn.Sequential(nn.Linear(4, 4)), x, K=1.0).eval()
    layer = net.get_submodule("0")
    original = layer.parametrizations.weight.original
    assert float(torch.linalg.matrix_norm(layer.weight.detach(), 2)) <= 1.0
    if write == "data":
        original.data.mul_(10)  # an EMA update, say: the version counter does not see it
    elif write == "no_grad":
        with torch.no_grad():
            original.mul_(10)
    elif write == "load_state_dict":
        state = {k: v * 10 if k.endswith("original") else v for k, v in net.state_dict().items()}
        net.load_state_dict(state)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=100.0)
        with torch.enable_grad():
            net(x).sum().backward()
        opt.step()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            w = layer.weight.detach()
        norm = float(torch.linalg.matrix_norm(w.double(), 2))
        assert norm == pytest.approx(1.0, rel=1e-4), (write, grad, norm)


# --- BatchNorm folding only where it is exact ------------------------------------------------------
class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.other, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(self.other(x))  # one BatchNorm called twice


class LinearBN1d(nn.Module):
    def __init__(self, t: int):
        super().__init__()
        self.fc, self.bn = nn.Linear(5, t), nn.BatchNorm1d(t)  # (B, T, F) with T == out_features

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("model,shape", [(SharedBN(), (1, 3, 6, 6)), (LinearBN1d(4), (2, 4, 5)),
                                         (nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), (3, 5))])
def test_batchnorm_is_folded_only_where_exact(model, shape):
    torch.manual_seed(0)
    for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
    model = model.double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    net = lipfx.convert(model, x, normalize=False, separable=None)
    torch.testing.assert_close(net(x), model(x), rtol=1e-10, atol=1e-10)
    # and the converted certificate still bounds the original's slopes
    found = secant_lower_bound(model, (x,), torch.Generator().manual_seed(0), pairs=40)
    assert found <= lipfx.certificate(net, x).bound
