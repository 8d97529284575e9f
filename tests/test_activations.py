"""Gradient-norm-preserving activations (issue 15, first part): MaxMin, GroupSort, Abs, and
``convert(..., activation=...)``."""

import io

import pytest
import torch
from torch import nn

import lipfx
from lipfx.activations import Abs, BetaAbs, GroupSort, Householder, MaxMin

GNP = [MaxMin(), MaxMin(dim=-1), GroupSort(2), GroupSort(3), GroupSort(4, dim=-1), Abs(), BetaAbs(), BetaAbs(0.3, dim=-1)]


def _fd_jacobian(f, x: torch.Tensor, h: float = 1e-7) -> torch.Tensor:
    """Central differences without autograd: exact for a piecewise-linear f away from its kinks."""
    cols = []
    for i in range(x.numel()):
        e = torch.zeros_like(x).reshape(-1)
        e[i] = h
        e = e.reshape(x.shape)
        cols.append(((f(x + e) - f(x - e)) / (2 * h)).reshape(-1))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("act", GNP, ids=repr)
def test_jacobian_is_orthogonal_almost_everywhere(act):
    """Every singular value of the Jacobian is 1 (GNP; ReLU's would be 0 wherever it is off),
    and secant quotients never exceed 1."""
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 7, 3), (1, 6, 2, 2)):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        s = torch.linalg.svdvals(_fd_jacobian(act, x))
        torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-6)
        y = x + torch.randn(shape, generator=g, dtype=torch.float64)
        assert float((act(x) - act(y)).norm()) <= float((x - y).norm()) * (1 + 1e-12)
    relu = _fd_jacobian(torch.relu, x)
    assert float(torch.linalg.svdvals(relu).min()) == 0.0  # what GNP avoids


@pytest.mark.parametrize("channels", [6, 7])
def test_householder_is_orthogonal_almost_everywhere_and_starts_as_maxmin(channels):
    g = torch.Generator().manual_seed(2)
    act = Householder(channels).double()
    x = torch.randn(1, channels, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(act(x), MaxMin()(x), rtol=0, atol=1e-6)  # t = -pi/4 (rounded to float32)
    act.theta.data = torch.rand(channels // 2, generator=g, dtype=torch.float64) * 6.3 - 3.15
    s = torch.linalg.svdvals(_fd_jacobian(act, x))
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-6)
    for _ in range(20):  # secants across the reflection lines: continuity makes them <= 1
        y = x + torch.randn(x.shape, generator=g, dtype=torch.float64)
        assert float((act(x) - act(y)).norm()) <= float((x - y).norm()) * (1 + 1e-12)
    # bf16 inputs: the reflection is computed in float32, so rounding is the only error
    xb = x.float().bfloat16()
    torch.testing.assert_close(act.float()(xb).float(), act.float()(xb.float()), rtol=1e-2, atol=1e-2)
    with pytest.raises(lipfx.ArgumentError, match="channels"):
        act(torch.randn(1, channels + 2, 3, dtype=torch.float64))


def test_beta_abs_values():
    x = torch.randn(2, 10, 3)
    out = BetaAbs(0.3)(x)
    torch.testing.assert_close(out[:, :3], x[:, :3].abs())
    torch.testing.assert_close(out[:, 3:], x[:, 3:])
    with pytest.raises(lipfx.ArgumentError, match="beta"):
        BetaAbs(1.5)


def test_convert_with_householder_learns_its_angles():
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3))
    x = torch.randn(4, 2, 4, 4)
    gm = lipfx.convert(net, x[:1], activation="householder")
    acts = [m for m in gm.modules() if isinstance(m, Householder)]
    assert len(acts) == 1 and acts[0].theta.shape == (3,)
    gm(x).square().sum().backward()
    assert acts[0].theta.grad is not None and float(acts[0].theta.grad.abs().sum()) > 0


def test_values_against_plain_sorting():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 3, generator=g)
    got = GroupSort(3)(x)
    for b in range(2):
        for k in range(3):
            col = x[b, :, k].tolist()
            want = sorted(col[0:3], reverse=True) + sorted(col[3:6], reverse=True) + col[6:]
            assert got[b, :, k].tolist() == want
    mm = MaxMin()(x)
    torch.testing.assert_close(mm[:, :3], torch.maximum(x[:, :3], x[:, 3:6]))
    torch.testing.assert_close(mm[:, 3:6], torch.minimum(x[:, :3], x[:, 3:6]))
    torch.testing.assert_close(mm[:, 6:], x[:, 6:])  # the odd channel passes through
    assert torch.equal(Abs()(x), x.abs())
    with pytest.raises(lipfx.ArgumentError, match="group_size"):
        GroupSort(1)


@pytest.mark.parametrize("activation, kind, name", [("maxmin", MaxMin, "resnet18"), ("groupsort", GroupSort, "mobilenet_v2")])
def test_convert_replaces_every_relu_like_activation(activation, kind, name, zoo):
    x = torch.randn(1, 3, 32, 32)
    net = lipfx.convert(zoo.shared(name, num_classes=10), x, activation=activation)
    modules = list(net.modules())
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in modules), name
    calls = [n for n in net.graph.nodes if n.op == "call_module" and isinstance(net.get_submodule(n.target), kind)]
    assert len(calls) == len(net.lipfx_report.by_action(f"activation-{activation}")) >= 10, name
    cert = lipfx.certificate(net, x)
    assert 0 < cert.bound < float("inf")
    # the certificate is above the secant quotients of the converted network
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a, b = torch.randn(2, 3, 32, 32, generator=g).split(1)
        b = a + 1e-2 * b
        ratio = float((net.eval()(a) - net(b)).norm() / (a - b).norm())
    assert ratio <= cert.bound


def test_functional_and_method_activations_are_replaced_and_in_place_readers_refused():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            return nn.functional.gelu(self.lin(x)).relu() + torch.relu(x)

    net = lipfx.convert(Functional(), torch.randn(2, 6), activation="abs", normalize=False)
    assert sum(isinstance(m, Abs) for m in net.modules()) == 3
    x = torch.randn(4, 6)
    m = Functional()
    m.load_state_dict({k.replace("lin.", "lin."): v for k, v in net.state_dict().items()})
    torch.testing.assert_close(net(x), m.lin(x).abs().abs() + x.abs())

    class Aliased(nn.Module):
        def forward(self, x):
            y = x * 2
            z = torch.relu_(y)  # writes y in place ...
            return z + y  # ... and y is read again: an out-of-place replacement would change this

    with pytest.raises(lipfx.LipfxError, match="in place"):
        lipfx.convert(Aliased(), torch.randn(2, 3), activation="maxmin", normalize=False)
    with pytest.raises(lipfx.ArgumentError, match="unknown activation"):
        lipfx.convert(Functional(), torch.randn(2, 6), activation="relu")


@pytest.mark.parametrize("dim, shape", [(1, (2, 7, 3)), (-1, (3, 2, 6))])
def test_maxmin_gradient_is_the_jacobian_the_values_follow(dim, shape):
    """MaxMin's own backward (a 0/1 mask and products) against central differences away from ties;
    at a tie the Jacobian autograd returns is still a permutation (orthogonal), where
    torch.maximum's would halve the gradient. Second derivatives go through (WGAN-GP-style
    penalties differentiate the gradient)."""
    g = torch.Generator().manual_seed(3)
    act = MaxMin(dim=dim)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(act, x).reshape(x.numel(), x.numel())
    torch.testing.assert_close(jac, _fd_jacobian(act, x), rtol=0, atol=1e-6)
    half = x.shape[dim] // 2
    tied = x.clone()
    tied.narrow(dim, 0, half).copy_(tied.narrow(dim, half, half))
    jac = torch.autograd.functional.jacobian(act, tied).reshape(x.numel(), x.numel())
    assert set(jac.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(jac @ jac.T, torch.eye(x.numel(), dtype=x.dtype), rtol=0, atol=0)
    x.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: act(t) * t, (x,))
    for dtype in (torch.float32, torch.bfloat16):
        xd = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
        act(xd).backward(torch.ones_like(xd))
        assert xd.grad.dtype == dtype and torch.equal(xd.grad, torch.ones_like(xd))
    # routed exactly even where hi - lo overflows: opposite gradients near float32's max
    xd = torch.randn(shape, generator=g).requires_grad_(True)
    big = torch.full(shape, 3e38).narrow(dim, 0, half)
    up = torch.cat((big, -big, torch.zeros_like(x.narrow(dim, 2 * half, x.shape[dim] - 2 * half), dtype=big.dtype)), dim)
    act(xd).backward(up)
    a, b = xd.detach().narrow(dim, 0, half), xd.detach().narrow(dim, half, half)
    want = torch.cat((torch.where(a >= b, big, -big), torch.where(a >= b, -big, big), up.narrow(dim, 2 * half, up.shape[dim] - 2 * half)), dim)
    assert torch.equal(xd.grad, want)


@pytest.mark.parametrize("dim", [1, -1])
def test_maxmin_works_under_torch_func_and_forward_ad(dim):
    """torch.func's transforms (which need the setup_context style) and forward-mode AD give the
    central-difference Jacobian, the batched map equals the per-sample one, and torch.compile
    traces MaxMin without a graph break."""
    g = torch.Generator().manual_seed(5)
    act = MaxMin(dim=dim)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    jac = _fd_jacobian(act, x)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(act)(x).reshape(jac.shape), jac, rtol=0, atol=1e-6)
    v = torch.randn(x.shape, generator=g, dtype=x.dtype)

    def tangent_of(z: torch.Tensor) -> torch.Tensor:
        with torch.autograd.forward_ad.dual_level():
            return torch.autograd.forward_ad.unpack_dual(act(torch.autograd.forward_ad.make_dual(z, v))).tangent

    torch.testing.assert_close(tangent_of(x).reshape(-1), jac @ v.reshape(-1), rtol=0, atol=1e-6)
    batch = torch.randn(4, *x.shape, generator=g, dtype=x.dtype)
    # vmap hides the batch dim: dim keeps meaning a per-sample dim
    assert torch.equal(torch.func.vmap(act)(batch), torch.stack([act(b) for b in batch]))
    grads = torch.func.vmap(torch.func.grad(lambda z: (act(z) * v).sum()))(batch)
    assert torch.equal(grads, torch.stack([torch.autograd.grad((act(b.requires_grad_()) * v).sum(), b)[0]
                                           for b in batch.clone()]))
    # a compiled training step: Dynamo refuses autograd.Functions with a custom jvp
    leaf = x.clone().requires_grad_(True)
    explained = torch._dynamo.explain(lambda z: (act(z) * v).sum())(leaf)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(lambda z: (act(z) * v).sum(), fullgraph=True, backend="aot_eager")
    compiled(leaf).backward()
    want = torch.autograd.grad((act(x.requires_grad_(True)) * v).sum(), x)[0]
    assert torch.equal(leaf.grad, want)
    x = x.detach()
    # compiled code under an open dual level, under torch.func, and with forward AD inside it
    # (each failed once on Dynamo's refusal of a custom jvp)
    with torch.autograd.forward_ad.dual_level():
        leaf.grad = None
        compiled(leaf).backward()
        assert torch.equal(leaf.grad, want)
    step = torch.compile(lambda z: (act(z) * v).sum(), fullgraph=True, backend="eager")
    assert torch.equal(torch.func.grad(step)(x), want)
    got = torch.compile(tangent_of, fullgraph=True, backend="eager")(x.clone().requires_grad_(True))
    torch.testing.assert_close(got.reshape(-1), jac @ v.reshape(-1), rtol=0, atol=1e-6)


def test_maxmin_scripts_and_traces():
    """TorchScript (scripted, and traced then saved) runs the plain expression: same values."""
    net = nn.Sequential(nn.Linear(4, 7), MaxMin())
    x = torch.randn(3, 4)
    assert torch.equal(torch.jit.script(net)(x), net(x))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(net, x), buffer)
    buffer.seek(0)
    assert torch.equal(torch.jit.load(buffer)(x), net(x))
