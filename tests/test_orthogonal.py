"""Gradient-norm-preserving conversion (issue 15): orthogonal and AOL pointwise/linear layers,
global l2 pooling and a last layer with unit rows. Every norm is checked by dense SVD or
secant quotients computed without autograd."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lipfx
from reference import dense_matrix
from steps import assert_round_trip, host_reads_while_training
from lipfx.layers import L2Pool, Shift
from lipfx.normalization.orthogonal import (AOLNormalization, OrthogonalNormalization, aol_rescale, bjorck_step, cayley,
                                          skew_from_columns, stiefel)
from lipfx.normalization.rows import UnitRows


def singular_values(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    w = weight.detach().double()
    return torch.linalg.svdvals(w.reshape(groups, w.shape[0] // groups, -1)).flatten()


def small_cnn(channels: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, 10))


def gnp_cnn(net: nn.Module, x: torch.Tensor) -> nn.Module:
    return lipfx.convert(net, x[:1], constraint="orthogonal", activation="maxmin", pooling="l2", last_layer="unit-rows")


def train_gnp(gm: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Adam on scaled cross-entropy; the losses, as floats."""
    opt = torch.optim.Adam(gm.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(gm(x) * 4, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


# --- AOL and the Cayley map -------------------------------------------------------------------
def test_aol_is_at_most_one_and_tight_where_it_should_be():
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in ((7, 7), (12, 5), (5, 12), (1, 9), (9, 1)):
        for scale in (1e-3, 1.0, 1e3):
            w = scale * torch.randn(20, *shape, generator=g, dtype=torch.float64)
            worst = max(worst, float(torch.linalg.matrix_norm(aol_rescale(w), ord=2).max()))
    assert worst <= 1 + 1e-12
    # equality: a rank-one matrix of equal entries (every Gershgorin row sum is attained)
    ones = torch.ones(6, 4, dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(aol_rescale(ones), ord=2)) == pytest.approx(1.0, abs=1e-12)
    assert float(torch.linalg.matrix_norm(aol_rescale(ones.T), ord=2)) == pytest.approx(1.0, abs=1e-12)
    # a zero column stays zero instead of becoming nan
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w[:, 1] = 0
    out = aol_rescale(w)
    assert torch.isfinite(out).all() and float(out[:, 1].abs().max()) == 0


def test_cayley_map_is_orthogonal_for_any_parameter():
    g = torch.Generator().manual_seed(1)
    for m, n in ((6, 6), (9, 4), (5, 1)):
        for scale in (1e-3, 1.0, 1e3):
            x = scale * torch.randn(3, m, n, generator=g, dtype=torch.float64)
            a = skew_from_columns(x)
            torch.testing.assert_close(a, -a.mT, rtol=0, atol=0)
            assert int((a.tril(-1)[..., :, n:] != 0).sum()) == 0  # only the first n columns are free
            q = cayley(a)
            eye = torch.eye(m, dtype=torch.float64).expand_as(q)
            torch.testing.assert_close(q.mT @ q, eye, rtol=0, atol=1e-9)
    zero = torch.zeros(2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(cayley(zero), torch.eye(4, dtype=torch.float64).expand(2, 4, 4))


@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (3, 8), (2, 5, 3)])
def test_stiefel_gradient_is_the_derivative_of_the_map(shape):
    """The Björck step after the solve runs outside autograd and passes the gradient through:
    at a (semi-)orthogonal Q its derivative is the identity on the tangent space the Cayley
    map moves in, so the gradient is the map's own. Checked against central differences of the
    whole map (gradcheck, float64) and, in float32, against autograd through the step."""
    g = torch.Generator().manual_seed(4)
    m = max(shape[-2:])
    base, _ = torch.linalg.qr(torch.randn(*shape[:-2], m, m, generator=g, dtype=torch.float64))
    x = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: stiefel(base, t), (x,))

    def through_the_step(b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tall = t if t.shape[-2] >= t.shape[-1] else t.mT
        q = bjorck_step((b @ cayley(skew_from_columns(tall)))[..., :tall.shape[-1]])
        return q if t.shape[-2] >= t.shape[-1] else q.mT

    x32, base32 = x.detach().float().requires_grad_(True), base.float()
    probe = torch.randn(stiefel(base32, x32).shape, generator=g)
    ours = torch.autograd.grad((stiefel(base32, x32) * probe).sum(), x32)[0]
    full = torch.autograd.grad((through_the_step(base32, x32) * probe).sum(), x32)[0]
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-5 * float(full.abs().max()))
    assert torch.equal(stiefel(base32, x32), through_the_step(base32, x32))  # the same values


# --- the parametrizations ---------------------------------------------------------------------
@pytest.mark.parametrize("shape, groups", [((24, 24), 1), ((8, 30), 1), ((30, 8), 1), ((12, 6), 2)])
def test_orthogonal_layer_has_every_singular_value_K_while_training(shape, groups):
    """Training mode: K times a (semi-)orthogonal matrix, before and after optimizer steps;
    eval mode: the certified rescale keeps it <= K."""
    K = 1.7
    if groups == 1:
        layer = nn.Linear(shape[1], shape[0])
    else:
        layer = nn.Conv2d(shape[1] * groups, shape[0], 1, groups=groups)
    p = OrthogonalNormalization(layer.weight, groups, K, name="layer")
    parametrize.register_parametrization(layer, "weight", p)
    g = torch.Generator().manual_seed(2)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    target = torch.randn(shape[0], generator=g)
    for step in range(101):  # Adam moves the parameter far: the map must stay orthogonal
        s = singular_values(layer.weight, groups)
        assert float(s.max()) <= K * (1 + 1e-5), step
        assert float(s.min()) >= K * (1 - 1e-5), step  # orthogonal, not merely bounded
        x = torch.randn(16, shape[1] * groups, *((1, 1) if groups > 1 else ()), generator=g)
        out = layer(x).reshape(16, -1)
        loss = (out - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = float(layer.parametrizations.weight.original.detach().abs().max())
    assert moved > 0.1, moved  # the parameter did travel (it starts at 0)
    layer.eval()
    s = singular_values(layer.weight, groups)
    assert float(s.max()) <= K and float(s.min()) >= K * (1 - 1e-5)


def test_polar_start_keeps_the_nearest_orthogonal_matrix():
    """The layer starts at U V^T, the nearest (semi-)orthogonal matrix to W."""
    g = torch.Generator().manual_seed(3)
    for shape in ((10, 10), (4, 10), (10, 4)):
        layer = nn.Linear(shape[1], shape[0], bias=False)
        w = torch.randn(*shape, generator=g)
        layer.weight.data.copy_(w)
        u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
        parametrize.register_parametrization(layer, "weight", OrthogonalNormalization(layer.weight, 1, 1.0))
        torch.testing.assert_close(layer.weight.detach().double(), u @ vh, rtol=0, atol=1e-5)


def test_aol_layer_is_bounded_without_any_state():
    g = torch.Generator().manual_seed(4)
    layer = nn.Linear(20, 12)
    p = AOLNormalization(layer.weight, 1, 2.0, initialize=False)
    parametrize.register_parametrization(layer, "weight", p)
    assert {n for n, _ in p.named_buffers()} == {"K", "residual"}  # no power-iteration state
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(20):
        loss = layer(torch.randn(8, 20, generator=g)).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert float(singular_values(layer.weight).max()) <= 2.0 * (1 + 1e-6)
    layer.eval()
    assert float(singular_values(layer.weight).max()) <= 2.0


def test_orthogonal_chain_certificate_is_the_product_of_K():
    """Linear layers compose into one linear map: orthogonal ones certify at exactly prod K
    (square), and the certificate stays above secant quotients of the real network."""
    net = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12))
    x = torch.randn(1, 12)
    gm = lipfx.convert(net, x, K={"0": 2.0, "1": 0.5, "2": 3.0}, constraint="orthogonal").eval().double()
    cert = lipfx.certificate(gm, x.double())
    assert cert.bound == pytest.approx(3.0, rel=1e-7)
    assert cert.bound <= 3.0
    with torch.no_grad():
        a, b = torch.randn(2, 12, dtype=torch.float64).split(1)
        ratio = float((gm(a) - gm(b)).norm() / (a - b).norm())
    assert ratio == pytest.approx(3.0, rel=1e-4)  # an isometry times 3: every secant attains it
    assert ratio <= cert.bound * (1 + 1e-6)


@pytest.mark.parametrize("constraint", ["orthogonal", "aol"])
def test_converted_cnn_trains_without_host_reads_and_certifies(constraint):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8)
    gm = lipfx.convert(small_cnn(), x[:1], constraint=constraint, activation="maxmin", pooling="l2",
                       last_layer="unit-rows")
    kinds = {type(p).__name__ for _, _, p in lipfx.normalized_layers(gm)}
    assert {"AOLNormalization": "aol", "OrthogonalNormalization": "orthogonal"}.get(
        next(k for k in kinds if k in ("AOLNormalization", "OrthogonalNormalization")), None) == constraint
    assert host_reads_while_training(gm, x, y) == 0
    gm.eval()
    cert = lipfx.certificate(gm, x[:1])
    assert 0 < cert.bound < float("inf")
    with torch.no_grad():
        a = x.double()
        b = a + 1e-2 * torch.randn_like(a)
        quotients = (gm.double()(a) - gm(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert float(quotients.max()) <= cert.bound


def test_non_finite_free_over_seeds_at_large_learning_rate():
    """The orthogonal path stays finite over 10 seeds at a large learning rate (Adam, lr 1e-1)."""
    for seed in range(10):
        torch.manual_seed(seed)
        x = torch.randn(16, 1, 8, 8)
        y = torch.randint(0, 10, (16,))
        gm = gnp_cnn(small_cnn(8), x)
        losses = train_gnp(gm, x, y, steps=15, lr=1e-1)
        assert all(math.isfinite(v) for v in losses), seed
        assert all(torch.isfinite(p).all() for p in gm.parameters()), seed


def test_constraint_options_are_checked_and_reported():
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(lipfx.ArgumentError, match="constraint"):
        lipfx.convert(small_cnn(), x, constraint="unitary")
    with pytest.raises(lipfx.ArgumentError, match="pooling"):
        lipfx.convert(small_cnn(), x, pooling="max")
    with pytest.raises(lipfx.ArgumentError, match="last_layer"):
        lipfx.convert(small_cnn(), x, last_layer="normalized")
    with pytest.raises(lipfx.LipfxError, match="nn.Linear"):
        lipfx.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(1, 4), last_layer="unit-rows")
    gm = lipfx.convert(small_cnn(), x, constraint="orthogonal")
    details = {r.name: r.detail for r in gm.lipfx_report.by_action("normalized")}
    assert "orthogonal" in details["2.pointwise"] and "fft@8x8 (not orthogonal: depthwise" in details["2.depthwise"]


def test_saving_keeps_the_orthogonal_state(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    gm = lipfx.convert(small_cnn(), x[:1], constraint="orthogonal", last_layer="unit-rows")
    back = assert_round_trip(gm, x, tmp_path / "net.pt")
    assert issubclass(parametrize.type_before_parametrizations(back.get_submodule("8")), nn.Linear)


# --- global l2 pooling --------------------------------------------------------------------------
def test_l2_pool_is_norm_preserving_and_one_lipschitz():
    g = torch.Generator().manual_seed(5)
    pool = L2Pool()
    for shape in ((3, 4, 5), (3, 4, 5, 6), (2, 3, 2, 3, 4)):
        a, b = torch.randn(2, *shape, generator=g, dtype=torch.float64).unbind(0)
        assert torch.allclose(pool(a).flatten(1).norm(dim=1), a.flatten(1).norm(dim=1))
        out = (pool(a) - pool(b)).flatten(1).norm(dim=1)
        assert (out <= (a - b).flatten(1).norm(dim=1) * (1 + 1e-12)).all()
    z = torch.zeros(1, 2, 3, 3, requires_grad=True)
    pool(z).sum().backward()
    assert torch.isfinite(z.grad).all()  # the kink at 0 gives a finite (sub)gradient


class _Means(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.how = how

    def forward(self, x):
        h = self.conv(x)
        if self.how == "method":
            return h.mean((2, 3))
        if self.how == "negative":
            return torch.mean(h, dim=[-1, -2], keepdim=True)
        if self.how == "functional":
            return F.adaptive_avg_pool2d(h, (1, 1))
        if self.how == "channels":
            return h.mean(1)  # not spatial: stays
        if self.how == "centring":
            return (h - h.mean((2, 3), keepdim=True)).flatten(1)  # not pooling: stays
        return F.adaptive_avg_pool2d(h, 2)  # not global: stays


@pytest.mark.parametrize("how, replaced", [("method", True), ("negative", True), ("functional", True),
                                            ("channels", False), ("centring", False), ("partial", False)])
def test_pooling_pass_replaces_global_averages_only(how, replaced):
    x = torch.randn(3, 2, 6, 6)
    model = _Means(how)
    gm = lipfx.convert(model, x, pooling="l2", normalize=False)
    pools = [m for m in gm.modules() if isinstance(m, L2Pool)]
    assert len(pools) == int(replaced)
    with torch.no_grad():
        h = model.conv(x)
        got = gm(x)
        if replaced:
            want = torch.linalg.vector_norm(h, dim=(2, 3), keepdim=got.dim() == 4)
        else:
            want = model(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_pooling_pass_on_the_zoo(name, zoo):
    x = torch.randn(1, 3, 32, 32)
    gm = lipfx.convert(zoo.shared(name, num_classes=10), x, pooling="l2", last_layer="unit-rows")
    assert len(gm.lipfx_report.by_action("pooling-l2")) == 1
    cert = lipfx.certificate(gm.eval(), x)
    assert 0 < cert.bound < float("inf")


# --- unit rows ----------------------------------------------------------------------------------
def test_unit_rows_and_pairwise_radii_hold_against_attacks():
    torch.manual_seed(6)
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    gm = gnp_cnn(small_cnn(), x)
    train_gnp(gm, x, y, steps=30, lr=1e-2)
    gm.eval()
    w = gm.get_submodule("8").weight.detach()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(10), rtol=0, atol=1e-6)
    cert = lipfx.certificate(gm, x[:1])
    pairwise = lipfx.robust.certified_radius(gm, x, y, cert)
    overall = lipfx.robust.certified_radius(gm, x, y, cert, method="global")
    assert (pairwise >= overall).all() and float(pairwise.max()) > 0
    # gradient-sign and random attacks at 0.99x each radius never flip the prediction
    xs = x.double().requires_grad_(True)
    net = gm.double()
    logits = net(xs)
    runner = logits.clone().scatter_(1, y[:, None], -math.inf).argmax(1)
    gap = logits.gather(1, y[:, None]) - logits.gather(1, runner[:, None])
    grad, = torch.autograd.grad(gap.sum(), xs)
    with torch.no_grad():
        for direction in (-grad, torch.randn_like(xs)):
            unit = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            moved = xs + 0.99 * pairwise.view(-1, 1, 1, 1) * unit
            keep = pairwise > 0
            assert (net(moved).argmax(1)[keep] == y[keep]).all()
    # the pairwise constants are the row differences times the features' bound
    rows = UnitRows()(torch.randn(5, 3))
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(5))


# --- spatial shifts -----------------------------------------------------------------------------
def test_shift_moves_each_channel_by_one_offset_and_has_norm_one():
    from reference import dense_matrix

    shift = Shift(9, (3, 3), padding=(1, 1)).double()
    x = torch.randn(2, 9, 5, 6, dtype=torch.float64)
    out = shift(x)
    padded = F.pad(x, (1, 1, 1, 1))
    offsets = [(1, 1)] + [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]  # centre first
    for c, (i, j) in enumerate(offsets):
        torch.testing.assert_close(out[:, c], padded[:, c, i:i + 5, j:j + 6], rtol=0, atol=0)
    m = dense_matrix(lambda z: shift(z), (9, 5, 6))
    s = torch.linalg.svdvals(m)
    assert float(s.max()) == pytest.approx(1.0, abs=1e-12)  # each input read at most once
    assert float(s.min()) == 0.0  # what the border loses
    strided = Shift(4, (3, 3), stride=(2, 2), padding=(1, 1)).double()
    m = dense_matrix(lambda z: strided(z), (4, 6, 6))
    assert float(torch.linalg.svdvals(m).max()) == pytest.approx(1.0, abs=1e-12)


def test_spatial_shift_conversion_is_lipnext_like_and_certified():
    torch.manual_seed(7)
    x = torch.randn(4, 1, 8, 8)
    gm = lipfx.convert(small_cnn(), x[:1], separable="fresh", spatial="shift", constraint="orthogonal",
                       activation="maxmin", pooling="l2", last_layer="unit-rows")
    shifts = gm.lipfx_report.by_action("spatial-shift")
    # the first conv (one input channel) is not rewritten; the other two become shift + pointwise
    assert len(shifts) == 2 and not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in gm.modules())
    assert all(isinstance(gm.get_submodule(r.name), Shift) for r in shifts)
    gm(x).sum().backward()
    gm.eval()
    cert = lipfx.certificate(gm, x[:1])
    with torch.no_grad():
        a = x
        b = a + 1e-2 * torch.randn_like(a)
        q = (gm(a) - gm(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert float(q.max()) <= cert.bound < float("inf")
    # with the exact rewrite (channel multiplier 9) the depthwise convs stay, and the report says why
    kept = lipfx.convert(small_cnn(), x[:1], spatial="shift")
    assert len(kept.lipfx_report.by_action("spatial-kept")) == 2
    assert "multiplier" in kept.lipfx_report.by_action("spatial-kept")[0].detail
    with pytest.raises(lipfx.ArgumentError, match="spatial"):
        lipfx.convert(small_cnn(), x[:1], spatial="roll")


def test_eval_weight_is_bounded_whatever_autocast_says():
    """Eval mode bounds the transformed weight once and applies it later: an autocast region
    at one of the two must not change the transform's values (it runs in float32 or wider)."""
    for factor_under_autocast in (True, False):
        for seed in range(3):
            torch.manual_seed(seed)
            layer = nn.Linear(48, 48)
            parametrize.register_parametrization(layer, "weight", OrthogonalNormalization(layer.weight, 1, 1.0))
            with torch.no_grad():
                layer.parametrizations.weight.original.add_(0.3 * torch.randn(48, 48))  # far from orthogonal
            layer.eval()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=factor_under_autocast), torch.no_grad():
                layer.weight  # the factor (and the cached weight) computed here
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not factor_under_autocast):
                w = layer.weight  # with grad: the transform again, the factor reused
            assert float(singular_values(w).max()) <= 1.0, (factor_under_autocast, seed)


def test_eval_cache_follows_the_orthogonal_base():
    """The eval weight depends on the base buffer as well as the parameter: a new base (e.g. a
    loaded one) must not be served with the old cached weight."""
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    for layer in (a, b):
        parametrize.register_parametrization(layer, "weight", OrthogonalNormalization(layer.weight, 1, 1.0))
        layer.eval()
    with torch.no_grad():
        before = a.weight.clone()
        a.parametrizations.weight[0].base.copy_(b.parametrizations.weight[0].base)
        after = a.weight
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, b.weight)


@pytest.mark.parametrize("n, scale", [(300, 1000.0), (512, 30.0)])
def test_orthogonal_stays_orthogonal_for_large_parameters(n, scale):
    """A float32 solve with a badly conditioned I + A is orthogonal only to ~1e-3; the Björck
    step after it brings every singular value back below K(1 + 1e-6) (found by an attack) and,
    squaring the error, within 1e-4 of K from below."""
    torch.manual_seed(0)
    layer = nn.Linear(n, n, bias=False)
    parametrize.register_parametrization(layer, "weight", OrthogonalNormalization(layer.weight, 1, 1.0))
    with torch.no_grad():
        layer.parametrizations.weight.original.normal_().mul_(scale)
    s = singular_values(layer.weight)
    assert float(s.max()) <= 1 + 1e-6 and float(s.min()) >= 1 - 1e-4


@pytest.mark.parametrize("shape", [(3, 24), (24, 3), (4, 27), (5, 5)])
def test_orthogonal_never_exceeds_K_for_huge_parameters(shape):
    """Entries ~1e7 make the float32 solve O(1) off for elongated or odd-sized matrices (found
    by an attack: a 3 x 24 layer measured norm 23.5, its unscaled Björck step enlarging every
    singular value above sqrt(3)); the scaled step keeps the layer at most K whatever the
    parameter, the training-mode claim."""
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0], bias=False)
    parametrize.register_parametrization(layer, "weight", OrthogonalNormalization(layer.weight, 1, 1.0))
    for scale in (1e7, 1e8, 1e12):
        with torch.no_grad():
            layer.parametrizations.weight.original.copy_(scale * torch.randn(shape))
        s = singular_values(layer.weight)
        assert torch.isfinite(s).all() and float(s.max()) <= 1 + 1e-6, (scale, float(s.max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_eval_weight_is_one_tensor_with_or_without_gradients(dtype):
    """Eval mode built its weight with gradients (scale rounded to the dtype first) and without
    (a Python float) by two expressions: in float16 they differed, and the certificate, taken
    with gradients on, bounded a weight 5e-5 below the one inference used (found by an attack).
    Both paths are now one expression, and the certificate covers the weight inference uses."""
    torch.manual_seed(0)
    x0 = torch.zeros(1, 3, 8, 8)
    gm = lipfx.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), x0, separable=None, constraint="orthogonal")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gm.parameters():
            p.copy_(3 * torch.randn(p.shape, generator=g))
    gm = gm.to(dtype).eval()
    conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        cached = conv.weight.detach().clone()
    assert torch.equal(conv.weight.detach(), cached)  # the gradient path
    bound = lipfx.certificate(gm, x0.to(dtype)).bound
    plain = nn.Conv2d(3, 8, 3, padding=1, bias=False).double()
    with torch.no_grad():
        plain.weight.copy_(cached.double())
    true = float(torch.linalg.matrix_norm(dense_matrix(plain, (3, 8, 8)), 2))
    assert true <= bound
