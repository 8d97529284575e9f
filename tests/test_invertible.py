"""Invertible residual blocks (issue 6): certified contraction, inverse with a sound error bound,
log-determinants against slogdet, and the refusal of branches without a certificate."""

import math
import re
import warnings

import pytest
import torch
from torch import nn

import lipfx
from lipfx.invertible import InvertibleResidual, InvertibleSequential, Squeeze

from empirical import empirical_lipschitz

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: (16,), 2: (6, 6), 3: (4, 4, 4)}


def branch(dim: int, channels: int = 2, hidden: int = 8) -> nn.Module:
    conv = CONV[dim]
    return nn.Sequential(conv(channels, hidden, 3, padding=1), nn.ELU(), conv(hidden, hidden, 1), nn.ELU(),
                         conv(hidden, channels, 3, padding=1))


def trained_block(dim: int, coeff: float, dtype=torch.float64, seed: int = 0, steps: int = 3) -> tuple[InvertibleResidual, torch.Tensor]:
    """A block after a few large SGD steps towards a random target, then in eval mode."""
    torch.manual_seed(seed)
    x = torch.randn(3, 2, *SIZE[dim], dtype=dtype)
    target = 3 * torch.randn_like(x)
    block = InvertibleResidual(branch(dim).to(dtype), coeff, x[:1])
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    for _ in range(steps):
        (block(x) - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return block.eval(), x


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.double().flatten(1).norm(dim=1)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("coeff", [0.5, 0.9, 0.97])
def test_inverse_reaches_tol_and_its_error_bound_holds(dim, coeff):
    block, x = trained_block(dim, coeff)
    c = block.contraction()
    assert 0 < c <= coeff
    with torch.no_grad():
        y = block(x)
    info = block.inverse(y, tol=1e-6, return_info=True)
    err = _norms(info.x - x)
    assert bool(info.converged.all())
    assert bool((err <= info.error_bound).all()), (err, info.error_bound)  # the bound is sound
    assert bool((info.error_bound <= 1e-6).all())
    # never more iterations than Banach's a-priori count for tol/2
    with torch.no_grad():
        first = _norms(block.branch(y))  # ||x_1 - x_0||, x_0 = y
    apriori = torch.ceil(torch.log(0.5e-6 * (1 - c) / first) / math.log(c))
    assert bool((info.iterations <= apriori).all())


def test_float32_inverse_bound_includes_round_off():
    block, x = trained_block(2, 0.97, dtype=torch.float32)
    with torch.no_grad():
        y = block(x)
    info = block.inverse(y, tol=1e-4, return_info=True)
    err = _norms(info.x - x.double())  # x is the exact preimage of y up to y's own rounding
    slack = _norms(y) * torch.finfo(torch.float32).eps / (1 - block.contraction())
    assert bool(info.converged.all())
    assert bool((err <= info.error_bound + slack).all())
    with pytest.raises(lipfx.LipfxError, match="missed tol=1e-12"):
        block.inverse(y, tol=1e-12, strict=True)  # below float32 round-off: said, not faked
    with pytest.warns(RuntimeWarning, match="round-off floor"):
        block.inverse(y, tol=1e-12)


def test_empirical_lipschitz_of_the_branch_never_exceeds_the_certificate():
    for dim, coeff in [(1, 0.9), (2, 0.5)]:
        block, x = trained_block(dim, coeff)
        c = block.contraction()
        found = empirical_lipschitz(block.branch, x[:1].shape, starts=2, iters=30, ascent=30)
        assert 0 < found <= c <= coeff
        assert block.lipschitz() == pytest.approx(1 + c) and block.inverse_lipschitz() == pytest.approx(1 / (1 - c))
    # a linear branch whose bound is exact (circular padding): the search reaches the
    # certificate, so the comparisons above have teeth
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    linear = InvertibleResidual(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular").double(), 0.8, x).eval()
    found = empirical_lipschitz(linear.branch, x.shape, starts=1, iters=100, ascent=0)
    assert 0.97 * linear.contraction() <= found <= linear.contraction() <= 0.8


def test_budget_holds_through_training_with_large_steps():
    block, _ = trained_block(2, 0.9, steps=6)
    assert block.contraction() <= 0.9
    for name, _, p in lipfx.normalized_layers(block.branch):
        assert p.constant() < 1, name  # every layer's K was scaled down to fit the budget


def _full_jacobian_logdet(block: InvertibleResidual, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: slogdet of the dense Jacobian of the whole block, one sample at a time."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda z: block(z.unsqueeze(0)).squeeze(0), xi)
        d = xi.numel()
        out.append(torch.linalg.slogdet(jac.reshape(d, d)).logabsdet)
    return torch.stack(out)


def test_exact_logdet_matches_slogdet_of_the_block_jacobian():
    block, x = trained_block(2, 0.9)
    with torch.no_grad():
        ref = _full_jacobian_logdet(block, x)
    y, ld = block.forward_and_logdet(x, "exact")
    assert torch.allclose(ld, ref, atol=1e-10)
    assert torch.allclose(y, block(x))
    with torch.no_grad():  # no graph is built (or returned) without grad mode
        y0, ld0 = block.forward_and_logdet(x, "exact")
    assert not y0.requires_grad and not ld0.requires_grad and torch.equal(ld0, ld.detach())
    assert bool((ld.abs() > 1e-3).all())  # a non-trivial determinant


def test_estimators_agree_with_exact_and_roulette_is_unbiased():
    # a linear branch (circular conv, so J is the same everywhere and large): the truncation
    # bias of a short series is then clearly visible, and the tail after 12 terms is < 0.6^13 d
    torch.manual_seed(0)
    x = torch.randn(2, 2, 4, dtype=torch.float64)
    block = InvertibleResidual(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular").double(), 0.6, x[:1]).eval()
    with torch.no_grad():
        exact = block.logdet(x, "exact")
        gen = torch.Generator().manual_seed(0)
        draws = 2000

        def mean_and_se(**kw):
            est = torch.stack([block.logdet(x, generator=gen, **kw) for _ in range(draws)])
            return est.mean(0), est.std(0) / math.sqrt(draws)

        roulette, se_r = mean_and_se(method="roulette", n_exact=1, p=0.3)
        series, se_s = mean_and_se(method="series", n_terms=12)
        first, se_1 = mean_and_se(method="series", n_terms=1)  # tr(J) only: biased
    assert bool(((roulette - exact).abs() <= 4 * se_r).all()), (roulette, exact, se_r)
    assert bool(((series - exact).abs() <= 4 * se_s + 8 * 0.6 ** 13).all()), (series, exact, se_s)
    assert bool(((first - exact).abs() > 6 * se_1).all()), (first, exact, se_1)  # the test can tell bias


def test_logdet_gradcheck_float64():
    block, x = trained_block(1, 0.9)
    x = x[:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: block.logdet(z, "exact"), (x,))
    assert torch.autograd.gradcheck(
        lambda z: block.logdet(z, "series", n_terms=4, gradient="backprop", generator=torch.Generator().manual_seed(1)), (x,))


def test_neumann_gradient_is_the_exact_gradient_in_expectation_and_nonzero_in_training():
    block, x = trained_block(1, 0.9)
    params = [p for p in block.parameters() if p.requires_grad]

    def grad(value):  # the last bias does not enter the logdet: its gradient is 0
        return [torch.zeros_like(p) if g is None else g for p, g in
                zip(params, torch.autograd.grad(value, params, allow_unused=True))]

    exact = grad(block.logdet(x, "exact").sum())
    gen = torch.Generator().manual_seed(0)
    draws = 400
    mean = [torch.zeros_like(p) for p in params]
    for _ in range(draws):
        grads = grad(block.logdet(x, "series", n_terms=15, generator=gen).sum())
        mean = [m + g / draws for m, g in zip(mean, grads)]
    flat_exact, flat_mean = torch.cat([g.flatten() for g in exact]), torch.cat([g.flatten() for g in mean])
    assert (flat_mean - flat_exact).norm() < 0.15 * flat_exact.norm()
    block.train()
    block.zero_grad()
    y, ld = block.forward_and_logdet(x, "roulette", generator=gen)
    (y.square().sum() - ld.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1) @ x


@pytest.mark.parametrize("bad,culprit", [
    (nn.Sequential(nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 8)), "Softplus"),
    (_Attention(), "matmul"),
])
def test_branch_without_a_certificate_is_refused_naming_the_culprit(bad, culprit):
    with pytest.raises(lipfx.LipfxError, match="cannot certify the branch below coeff=0.9") as exc:
        InvertibleResidual(bad, 0.9, torch.randn(1, 5, 8))
    assert culprit in str(exc.value)


def test_squeeze_is_an_exact_permutation_in_1d_2d_3d():
    x2 = torch.randn(2, 3, 4, 6)
    assert torch.equal(Squeeze(2)(x2), nn.PixelUnshuffle(2)(x2))
    for shape in [(2, 3, 8), (2, 3, 4, 6), (2, 1, 4, 4, 2)]:
        x = torch.randn(shape)
        y = Squeeze(2)(x)
        assert y.shape[1] == shape[1] * 2 ** (len(shape) - 2)
        assert torch.equal(Squeeze(2).inverse(y), x)
        assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)
    with pytest.raises(lipfx.ShapeError, match="not divisible"):
        Squeeze(2)(torch.randn(1, 1, 5, 4))


def test_sequential_inverse_logdet_and_constants():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    first = InvertibleResidual(branch(2).double(), 0.9, x[:1])
    second = InvertibleResidual(branch(2, channels=8).double(), 0.8, torch.zeros(1, 8, 2, 2, dtype=torch.float64))
    flow = InvertibleSequential(first, Squeeze(2), second).eval()
    with torch.no_grad():
        y = flow(x)
        info = flow.inverse(y, tol=1e-7, return_info=True)
    assert bool(info.converged.all()) and bool((_norms(info.x - x) <= info.error_bound).all())
    y2, ld = flow.forward_and_logdet(x, "exact")
    assert torch.allclose(y2, y)
    with torch.no_grad():
        expected = first.logdet(x, "exact") + second.logdet(Squeeze(2)(first(x)), "exact")
    assert torch.allclose(ld, expected)
    assert flow.lipschitz() == pytest.approx(first.lipschitz() * second.lipschitz())
    assert flow.inverse_lipschitz() == pytest.approx(first.inverse_lipschitz() * second.inverse_lipschitz())
    with pytest.raises(TypeError, match="lacks inverse"):
        InvertibleSequential(first, nn.ReLU())


def test_state_dict_round_trip_and_inverse_before_any_forward():
    block, x = trained_block(2, 0.9)
    torch.manual_seed(5)
    fresh = InvertibleResidual(branch(2).double(), 0.9, x[:1]).eval()
    fresh.load_state_dict(block.state_dict())
    with torch.no_grad():
        y = block(x)
        assert torch.equal(fresh(x), y)
    again = InvertibleResidual(branch(2).double(), 0.9, x[:1]).eval()
    again.load_state_dict(block.state_dict())
    info = again.inverse(y, tol=1e-6, return_info=True)  # no forward call before the inverse
    assert block.inverse(y).shape == y.shape and "_reference" not in str(block)
    assert bool(info.converged.all())
    assert block.state_dict().keys() == fresh.state_dict().keys()  # no cached copies saved
    # only K and the training bounds' state: one vector per group of a 1x1 layer; for a conv kept
    # whole, its sweep (per frequency block a value, a slack and a vector: about one input's worth)
    for name, t in block.named_buffers():
        leaf = name.rpartition(".")[2]
        assert leaf in ("K", "v", "residual", "_prev", "_steps", "_columns") or \
            re.fullmatch(r"(spectral_v|_vals|_slack|_cursor|_pairs|_cosines)\d+", leaf), name
        if leaf.startswith("spectral_v"):
            assert t.numel() <= 2 * 4 * x[0, 0].numel() * 16, (name, t.shape)  # 2 reals x phases x size x hidden


def test_wrong_input_size_and_training_mode_inverse_are_reported():
    block, x = trained_block(2, 0.9)
    with pytest.raises(lipfx.ShapeError, match=r"certified for inputs of shape \(N, 2, 6, 6\)"):
        block(torch.randn(1, 2, 8, 8, dtype=torch.float64))
    block.train()
    with pytest.warns(RuntimeWarning, match="training mode"):
        block.inverse(x.detach())
    with pytest.raises(ValueError, match=r"coeff must be in \(0, 1\)"):
        InvertibleResidual(branch(2), 1.0, x[:1].float())
    # no example_inputs: certified at every input size (see test_without_example_inputs_...)
    assert InvertibleResidual(branch(2), 0.9).certified_at == "every input size"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block.eval().inverse(x.detach())  # eval mode, reachable tol: silent


def test_certificate_traces_through_blocks_and_squeezes():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    flow = InvertibleSequential(InvertibleResidual(branch(2).double(), 0.9, x), Squeeze(2),
                                InvertibleResidual(branch(2, channels=8).double(), 0.7, torch.zeros(1, 8, 2, 2, dtype=torch.float64))).eval()
    cert = lipfx.certificate(flow, x)
    assert math.isfinite(cert.bound)
    assert any("space-to-depth" in r.method for r in cert.records)
    assert empirical_lipschitz(flow, x.shape, starts=2, iters=30, ascent=30) <= cert.bound


def _dense_lipschitz(g: nn.Module, shape: tuple, at: torch.Tensor = None) -> float:
    """Largest singular value of g's Jacobian at ``at`` (zero by default), from the dense matrix."""
    at = torch.zeros(1, *shape, dtype=torch.float64) if at is None else at
    jac = torch.autograd.functional.jacobian(lambda z: g(z), at).reshape(math.prod(shape), math.prod(shape))
    return float(torch.linalg.matrix_norm(jac, 2))


def test_without_example_inputs_certifies_every_input_size():
    torch.manual_seed(0)
    # kernel a_t * M with a_t >= 0 and circular padding: the operator norm is the same at every
    # size and equal to the triangle bound, so the contraction must be sound AND within 2%
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.rand(3, 3, dtype=torch.float64)[None, None] * torch.randn(2, 2, 1, 1, dtype=torch.float64))
    generic = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ELU(), nn.Conv2d(6, 2, 3, padding=1)).double()
    for g, tight in ((conv, True), (generic, False)):
        block = InvertibleResidual(g, 0.9).eval()
        assert block.certified_at == lipfx.invertible.EVERY_SIZE and "certified_at=every input size" in repr(block)
        c = block.contraction()
        assert 0 < c <= 0.9
        for size in (5, 11):
            shape = (2, size, size)
            x = torch.randn(3, *shape, dtype=torch.float64)
            true = max(_dense_lipschitz(block.branch, shape, x[i:i + 1]) for i in range(len(x)))
            assert true <= c * (1 + 1e-9), (size, true, c)
            if tight:  # the check has teeth: a constant 2% smaller would fail it
                assert 0.98 * c < true
            y = block(x)  # any size is accepted, and inverted within the certified error
            info = block.inverse_with_info(y, tol=1e-8)
            assert bool(info.converged.all()) and float((info.x - x).flatten(1).norm(dim=1).max()) <= 1e-8
    with pytest.raises(lipfx.ArgumentError, match="pass example_inputs"):
        InvertibleResidual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(3, 1, 1)), 0.9)
    with pytest.raises(lipfx.ArgumentError, match="pass example_inputs"):
        InvertibleResidual(nn.Sequential(nn.ELU(), nn.Conv2d(2, 2, 3, padding=1)), 0.9)
    sized = InvertibleResidual(nn.Conv2d(2, 2, 3, padding=1), 0.9, torch.randn(1, 2, 6, 6))
    assert sized.certified_at == (2, 6, 6) and "certified_at=2x6x6" in repr(sized)


def test_inverse_with_info_is_typed_and_return_info_is_deprecated():
    block, x = trained_block(2, 0.9)
    flow = InvertibleSequential(block, Squeeze(2))
    with torch.no_grad():
        y = flow(x)
    for m, z in ((flow, y), (block, x), (flow[1], y)):
        info = m.inverse_with_info(z, tol=1e-6)
        assert isinstance(info, lipfx.invertible.InverseResult)
        plain = m.inverse(z, tol=1e-6)
        assert isinstance(plain, torch.Tensor) and torch.equal(plain, info.x)
        with pytest.warns(DeprecationWarning, match="inverse_with_info"):
            old = m.inverse(z, tol=1e-6, return_info=True)
        assert isinstance(old, lipfx.invertible.InverseResult) and torch.equal(old.x, info.x)


def test_writes_through_data_and_running_statistics_refresh_the_contraction():
    """The certified contraction and the float64 copy the inverse checks against follow every
    change of the branch's values: writes through .data keep the version counter (EMA updates,
    some loaders), and BatchNorm statistics are buffers. Before, a stale contraction of 0.56
    was kept for a branch of norm 0.90, and an inverse reported convergence 17 from its answer."""
    def fresh(block):
        with torch.no_grad():
            return lipfx.certificate(block.branch.eval(), torch.zeros(1, 8, dtype=block_dtype(block))).bound

    def block_dtype(block):
        return next(block.branch.parameters()).dtype

    torch.manual_seed(0)
    b = InvertibleResidual(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), 0.9).double().eval()
    before = b.contraction()
    for name, buf in b.branch.named_buffers():
        if name.endswith("K"):
            buf.data.mul_(0.5)  # K written through .data: the version counter does not move
    assert b.contraction() == pytest.approx(fresh(b), rel=1e-9) and b.contraction() < 0.5 * before * 1.001

    b = InvertibleResidual(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), 0.9).eval()  # float32
    b.contraction()
    for name, p in b.branch.named_parameters():
        if "bias" in name:
            p.data.add_(5.0)
    y = torch.randn(4, 8)
    info = b.inverse_with_info(y, tol=1e-5, dtype=torch.float64)  # iterates on the float64 copy
    with torch.no_grad():
        err = (b(info.x.float()).double() - y.double()).norm(dim=1)
    assert info.converged.all() and bool((err <= 1e-3).all()), err

    b = InvertibleResidual(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 8)),
                           0.9, bn=None).double()
    b.contraction()
    b.train()
    for _ in range(50):  # running statistics of small-variance data raise BatchNorm's gain
        b(0.01 * torch.randn(32, 8, dtype=torch.float64))
    b.eval()
    with pytest.raises(lipfx.LipfxError, match=">= 1"):
        b.contraction()
