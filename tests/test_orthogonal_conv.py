"""AOL and orthogonal (BCOP) kernels for spatial convs kept whole (issue 15, docs/math.md 16).

Every norm is checked against the dense matrix of the real conv (its columns are the conv
applied to basis images, torch's own padding), by SVD."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

import lipfx
from lipfx.normalization.orthogonal import AOLNormalization, OrthogonalNormalization
from lipfx.normalization.orthogonal_conv import (AOLConvNormalization, OrthogonalConvNormalization, aol_conv,
                                                 block_kernel, gnp_conv_reason)
from lipfx.norms.geometry import conv_geometry
from reference import dense_matrix
from steps import assert_round_trip, host_reads_while_training

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def dense(conv: nn.Module, weight: torch.Tensor, size: tuple) -> torch.Tensor:
    """The conv with kernel ``weight`` as a matrix (out, in), in float64, by running it."""
    cin = conv.in_channels
    # a fresh conv of the same geometry (removing the parametrization from a deepcopy would
    # delete the weight property from the class the copy shares with ``conv``)
    kind = parametrize.type_before_parametrizations(conv)
    probe = kind(cin, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                 dilation=conv.dilation, groups=conv.groups, bias=False, padding_mode=conv.padding_mode).double()
    with torch.no_grad():
        probe.weight.copy_(weight.double())
        return dense_matrix(probe, (cin, *size))


def bcop(conv: nn.Module, size: tuple, seed: int = 0, scale: float = 1.0) -> OrthogonalConvNormalization:
    """Register an orthogonal kernel on ``conv`` and move every parameter far from its start."""
    p = OrthogonalConvNormalization(conv, [size], 1.0, name="conv")
    parametrize.register_parametrization(conv, "weight", p)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p.projectors.copy_(scale * torch.randn(p.projectors.shape, generator=g))
        original = conv.parametrizations.weight.original
        original.copy_(scale * torch.randn(original.shape, generator=g))
    return p


# (dims, in, out, kernel, keyword arguments): square, isometry, co-isometry, groups, dilation, 1d, 3d
_CIRCULAR = [
    (2, 4, 4, 3, {}), (2, 3, 6, 3, {}), (2, 6, 3, 3, {}), (2, 4, 6, 3, dict(groups=2)),
    (2, 4, 4, 3, dict(dilation=2)), (2, 4, 4, 5, {}), (2, 4, 4, 2, {}), (1, 3, 5, 3, {}), (3, 2, 2, 3, {}),
]


@pytest.mark.parametrize("dims, cin, cout, k, kw", _CIRCULAR)
def test_bcop_circular_conv_is_an_isometry_or_co_isometry(dims, cin, cout, k, kw):
    """On a torus (the basis images wrapped by F.pad(mode="circular"), then the conv), every
    singular value is 1, whatever the parameters: all of them for the square and wide kinds,
    the input dimension's worth for the tall ones."""
    conv = CONV[dims](cin, cout, k, **kw)
    size = {1: (9,), 2: (5, 6), 3: (4, 3, 4)}[dims]
    p = bcop(conv, size)
    w = p.transform(conv.parametrizations.weight.original).detach().double()
    reach = conv.dilation[0] * (k - 1)  # the wrap: reach pixels, split low / high
    pads = [reach // 2, reach - reach // 2] * dims
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    torus = lambda t: conv_fn(F.pad(t, pads, mode="circular"), w, dilation=conv.dilation, groups=conv.groups)  # noqa: E731
    matrix = dense_matrix(torus, (cin, *size))
    s = torch.linalg.svdvals(matrix)
    assert s.shape[0] == min(cin, cout) * torch.Size(size).numel()
    assert float((s - 1).abs().max()) < 1e-5, (float(s.min()), float(s.max()))


# (dims, in, out, kernel, stride, groups, torus size): co-isometries (R wide), isometries (R tall),
# groups, a 1x2 stride, 1d and 3d
_STRIDED = [
    (2, 4, 8, 3, 2, 1, (8, 6)), (2, 2, 3, 3, 2, 1, (6, 8)), (2, 4, 20, 3, 2, 1, (6, 6)), (2, 4, 6, 3, 2, 2, (8, 6)),
    (2, 4, 6, 4, (1, 2), 1, (5, 6)), (1, 3, 5, 3, 2, 1, (10,)), (3, 2, 8, 2, 2, 1, (4, 2, 4)),
]


@pytest.mark.parametrize("dims, cin, cout, k, stride, groups, size", _STRIDED)
def test_strided_bcop_is_an_isometry_or_co_isometry_as_a_strided_conv(dims, cin, cout, k, stride, groups, size):
    """A strided conv gets U (BCOP blocks) then R on disjoint stride-sized patches: on a torus
    whose sides the stride divides, the strided conv itself (not the stride-1 conv it
    subsamples) has every singular value 1, so the network's bound composes without loss."""
    conv = CONV[dims](cin, cout, k, stride=stride, padding=k // 2, groups=groups)
    p = bcop(conv, size)
    assert p.patch == conv.stride and "strided" in p.kind
    w = p.transform(conv.parametrizations.weight.original).detach().double()
    s = _torus_singular_values(conv, w, size)
    assert float((s - 1).abs().max()) < 1e-5, (float(s.min()), float(s.max()))
    zero_padded = torch.linalg.svdvals(dense(conv, w, size))
    assert float(zero_padded.max()) <= 1 + 1e-6


def _torus_singular_values(conv: nn.Module, w: torch.Tensor, size: tuple) -> torch.Tensor:
    """Every singular value of the strided conv with kernel ``w`` on a torus of ``size``."""
    pads = [q for kk, s in zip(reversed(conv.kernel_size), reversed(conv.stride)) for q in (kk - s, 0)]
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    torus = lambda t: conv_fn(F.pad(t, pads, mode="circular"), w, stride=conv.stride, groups=conv.groups)  # noqa: E731
    matrix = dense_matrix(torus, (conv.in_channels, *size))
    s = torch.linalg.svdvals(matrix)
    assert s.shape[0] == min(matrix.shape)
    return s


class _ComputeDtypes(TorchDispatchMode):
    """Records the dtypes of every matmul, solve and conv run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(k in name for k in ("mm", "solve", "convolution", "mv")):
            self.seen += [(name, a.dtype) for a in args if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def _gnp_map(index: int) -> tuple[nn.Module, torch.Tensor]:
    """(map, raw weight): orthogonal linear, AOL 1x1, BCOP, strided BCOP (a conv of
    ``_STRIDED``), AOL conv (a conv of ``_AOL_CONV``)."""
    if index < 2:
        kind = OrthogonalNormalization if index == 0 else AOLNormalization
        w = torch.randn(16, 8) if index == 0 else torch.randn(8, 16, 1, 1)
        return kind(w.clone(), 1, 1.0), w + 0.1 * torch.randn(w.shape)
    if index < 4:
        conv = nn.Conv2d(8, 16, 3, padding=1) if index == 2 else _STRIDED()
        return bcop(conv, (6, 6) if index == 2 else (8, 8)), conv.parametrizations.weight.original
    conv = _AOL_CONV()
    return AOLConvNormalization(conv, [(6, 6)], 1.0, name="conv"), conv.weight


def _STRIDED() -> nn.Module:
    return nn.Conv2d(16, 16, 3, stride=2, padding=1)


def _AOL_CONV() -> nn.Module:
    return nn.Conv2d(8, 4, 3, padding=1)


@pytest.mark.parametrize("index", range(5), ids=["orthogonal", "aol", "bcop", "bcop-strided", "aol-conv"])
def test_gnp_maps_on_cuda_compute_in_float64(index):
    """On CUDA, float32 matmuls and convs may run in TF32 (cuDNN's default for convs,
    ``set_float32_matmul_precision("high")`` for matmuls): operands rounded to 10 mantissa bits,
    and an orthogonal weight built that way is off by ~4e-4 (simulated on CPU), above the norm 1
    training mode claims. So every product, solve and conv of the maps runs in float64 there.
    Checked on this machine with fake CUDA tensors (no device needed): on the CPU the same maps
    run in float32, so the check can tell the two apart."""
    p, weight = _gnp_map(index)
    with _ComputeDtypes() as cpu:
        assert p.transform(weight).dtype == torch.float32
    assert cpu.seen and {d for _, d in cpu.seen} == {torch.float32}, cpu.seen
    with FakeTensorMode(allow_non_fake_inputs=True):
        p_cuda, w_cuda = p.to("cuda"), weight.to("cuda")
        with _ComputeDtypes() as cuda:
            out = p_cuda.transform(w_cuda)
        assert out.device.type == "cuda" and out.dtype == torch.float32
    assert {d for _, d in cuda.seen} == {torch.float64}, cuda.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (TF32 convs and matmuls)")
@pytest.mark.parametrize("index", range(5), ids=["orthogonal", "aol", "bcop", "bcop-strided", "aol-conv"])
def test_gnp_maps_built_on_cuda_with_tf32_on_keep_their_norm(index, monkeypatch):
    """The real thing on a GPU, TF32 on for convs and matmuls: the map's output has norm <= 1
    to float32 rounding, and the orthogonal ones every singular value 1."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    p, weight = _gnp_map(index)
    w = p.cuda().transform(weight.detach().cuda()).detach().cpu().double()
    if index == 3:
        s = _torus_singular_values(_STRIDED(), w, (8, 8))
    elif index == 4:
        s = torch.linalg.svdvals(dense(_AOL_CONV(), w, (6, 6)))
    elif index == 2:  # zero padding crops the whole-grid isometry: norm <= 1, not every value 1
        s = torch.linalg.svdvals(dense(nn.Conv2d(8, 16, 3, padding=1), w, (6, 6)))
    else:
        s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
    assert float(s.max()) <= 1 + 1e-5, float(s.max())
    if index in (0, 3):
        assert float(s.min()) >= 1 - 1e-5, float(s.min())


def test_strided_convs_that_keep_the_subsampled_kernel():
    """Dilated, kernel smaller than the stride, or circular padding (whose wrap would put
    patches on top of each other): the stride-1 construction, subsampled, norm <= 1."""
    for conv in (nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2), nn.Conv2d(4, 8, 1, stride=2),
                 nn.Conv2d(4, 8, 3, stride=2, padding=1, padding_mode="circular")):
        p = bcop(conv, (7, 7))
        assert p.patch is None and "strided" not in p.kind
        w = p.transform(conv.parametrizations.weight.original).detach()
        assert float(torch.linalg.svdvals(dense(conv, w, (7, 7))).max()) <= 1 + 1e-6


@pytest.mark.parametrize("kw, size", [(dict(padding=1), (6, 6)), (dict(stride=2, padding=1), (8, 8)),
                                      (dict(padding=2, dilation=2), (7, 5)), (dict(padding=0), (6, 6))])
def test_bcop_zero_padded_conv_is_bounded_by_one_and_nearly_attains_it(kw, size):
    """Zero padding crops the whole-grid isometry (and a stride subsamples it): norm <= 1, the
    training-mode claim. Unstrided, the norm is within 2% of 1 (shrink the claim by 2% and this
    fails); the certified FFT bound of the kernel, which eval mode divides by, is within 2% of
    the dense SVD in every case."""
    conv = nn.Conv2d(4, 8, 3, **kw)
    p = bcop(conv, size, seed=3)
    w = p.transform(conv.parametrizations.weight.original).detach()
    top = float(torch.linalg.svdvals(dense(conv, w, size)).max())
    assert top <= 1 + 1e-6
    if conv.stride == (1, 1):
        assert top >= 0.98
    assert top * (1 - 1e-9) <= p.exact_bound(w) <= 1.02 * top


def test_bcop_starts_delta_orthogonal_at_the_kernels_polar_factor():
    """At registration the kernel is H at its centre tap, H the polar factor of the old kernel's
    tap sum; every raw parameter is 0."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    old = conv.weight.detach().clone()
    parametrize.register_parametrization(conv, "weight", OrthogonalConvNormalization(conv, [(6, 6)], 1.0))
    w = conv.weight.detach()
    centre = w[:, :, 1, 1]
    u, _, vh = torch.linalg.svd(old.sum((2, 3)).double(), full_matrices=False)
    torch.testing.assert_close(centre.double(), u @ vh, atol=1e-6, rtol=0)
    assert float(w.abs().sum() - centre.abs().sum()) < 1e-5
    assert float(conv.parametrizations.weight.original.detach().abs().max()) == 0.0


def test_block_kernel_composes_like_the_convs_it_stands_for():
    """The kernel of two 2-tap blocks equals applying the two convs one after the other."""
    g = torch.Generator().manual_seed(1)
    c = 3
    a, b = (torch.randn(c, c, generator=g, dtype=torch.float64) for _ in range(2))
    k = block_kernel(torch.stack((a, b))[None], (3,))[0]  # (c, c, 3)
    x = torch.randn(2, c, 11, generator=g, dtype=torch.float64)
    step = lambda t, m: F.conv1d(t, torch.stack((m, torch.eye(c, dtype=m.dtype) - m), -1))  # noqa: E731
    torch.testing.assert_close(F.conv1d(x, k), step(step(x, b), a))


def test_block_kernel_with_side_matrices_composes_like_its_convs_in_2d_and_3d():
    """Blocks along several dims (some of one tap) and the side matrices folded into the first
    and last dims' taps: the kernel's conv equals right, then the blocks from the last to the
    first, then left, each run as its own conv."""
    g = torch.Generator().manual_seed(2)
    c, o, i = 3, 2, 4
    for kernel_size in ((3, 2), (1, 3), (2, 3, 2), (4, 1)):
        nd = len(kernel_size)
        blocks = [d for d, k in enumerate(kernel_size) for _ in range(k - 1)]
        p = torch.randn(2, len(blocks), c, c, generator=g, dtype=torch.float64)
        left = torch.randn(2, o, c, generator=g, dtype=torch.float64)
        right = torch.randn(2, c, i, generator=g, dtype=torch.float64)
        k = block_kernel(p, kernel_size, left=left, right=right)  # (2, o, i, *kernel_size)
        assert k.shape == (2, o, i, *kernel_size)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        x = torch.randn(2, 2 * i, *(7,) * nd, generator=g, dtype=torch.float64)
        point = lambda m: m.reshape(-1, m.shape[-1], *(1,) * nd)  # noqa: E731  (2, a, b) -> grouped 1x1 kernel
        y = conv(x, point(right), groups=2)
        for j in reversed(range(len(blocks))):
            taps = [1] * nd
            taps[blocks[j]] = 2
            eye = torch.eye(c, dtype=torch.float64)
            two = torch.stack((p[:, j], eye - p[:, j]), -1).reshape(2 * c, c, *taps)
            y = conv(y, two, groups=2)
        y = conv(y, point(left), groups=2)
        torch.testing.assert_close(conv(x, k.reshape(2 * o, i, *kernel_size), groups=2), y)


@pytest.mark.parametrize("cin, cout, kw", [(4, 4, dict(padding=1)), (3, 7, dict(padding=1)), (7, 3, dict(padding=1)),
                                           (4, 6, dict(padding=1, groups=2, stride=2)),
                                           (4, 4, dict(padding=2, dilation=2)),
                                           (4, 4, dict(padding=1, padding_mode="circular")),
                                           (2, 6, dict(padding=1, groups=2))])
def test_aol_conv_is_at_most_one_for_any_kernel(cin, cout, kw):
    """AOL's Schur bound against the real conv's dense SVD, over random kernels (heavy-tailed
    ones too); and it is not vacuous: the largest singular value stays above 0.3."""
    conv = nn.Conv2d(cin, cout, 3, **kw)
    g = torch.Generator().manual_seed(2)
    tops = []
    for trial in range(6):
        w = torch.randn(conv.weight.shape, generator=g) ** (1 + trial % 3)
        tops.append(float(torch.linalg.svdvals(dense(conv, aol_conv(w.double(), conv.groups), (6, 6))).max()))
    assert max(tops) <= 1 + 1e-9
    assert min(tops) >= 0.3


def test_aol_leaves_an_orthogonal_kernel_as_it_is():
    """An orthogonal kernel's Gram kernel is the identity at offset 0: AOL keeps it, so it loses
    nothing on a layer that is already gradient-norm-preserving."""
    for cin, cout in ((4, 4), (3, 6), (6, 3)):
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        p = bcop(conv, (6, 6), seed=cin)
        w = p.transform(conv.parametrizations.weight.original).detach().double()
        torch.testing.assert_close(aol_conv(w, 1), w, atol=2e-6, rtol=0)


def test_which_convs_take_a_gnp_kernel():
    reason = lambda conv: gnp_conv_reason(conv_geometry(conv, "c"))  # noqa: E731
    assert reason(nn.Conv2d(4, 4, 3, padding=1)) is None
    assert reason(nn.Conv2d(1, 8, 3, padding=1)) is None  # one input channel: an isometry 1 -> 8
    assert "depthwise" in reason(nn.Conv2d(4, 8, 3, padding=1, groups=4))
    assert "depthwise" in reason(nn.Conv2d(4, 4, 3, padding=1, groups=4))
    assert reason(nn.Conv2d(4, 6, 3, padding=1, groups=2)) is None
    assert "reflect" in reason(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert reason(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")) is None
    assert "circular" in reason(nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular"))  # wraps twice
    with pytest.raises(lipfx.ArgumentError, match="'c'.*reflect"):
        AOLConvNormalization(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), [(6, 6)], 1.0, name="c")


def small_cnn(c: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10))


@pytest.mark.parametrize("constraint, kind", [("orthogonal", OrthogonalConvNormalization), ("aol", AOLConvNormalization)])
def test_converted_cnn_with_gnp_convs_trains_without_host_reads_and_certifies(constraint, kind):
    """convert(separable=None, constraint=...): the zero-padded convs get the kernel, the
    reflect-padded one stays spectral; training reads nothing on the host; the eval network's
    certificate is above secant quotients of the real network and every layer's FFT bound <= K."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8)
    gm = lipfx.convert(small_cnn(), x[:1], separable=None, constraint=constraint, activation="maxmin",
                       pooling="l2", last_layer="unit-rows", K=1.5)
    kinds = {name: type(p) for name, _, p in lipfx.normalized_layers(gm)}
    assert [kinds[n] is kind for n in ("0", "2", "4")] == [True] * 3
    assert kinds["6"].__name__ == "ConvNormalization"
    detail = {r.name: r.detail for r in gm.lipfx_report.by_action("normalized")}["6"]
    assert f"not {constraint}: reflect padding" in detail
    assert host_reads_while_training(gm, x, y, lr=5e-2) == 0
    if constraint == "orthogonal":
        assert float(gm.get_submodule("2").parametrizations.weight[0].projectors.detach().abs().max()) > 0  # they learn
    gm.eval()
    for name in ("0", "2", "4"):
        conv = gm.get_submodule(name)
        top = float(torch.linalg.svdvals(dense(conv, conv.weight.detach(), (8, 8))).max())
        assert top <= 1.5 * (1 + 1e-6), name
    cert = lipfx.certificate(gm, x[:1])
    with torch.no_grad():
        a = x.double()
        b = a + 1e-2 * torch.randn_like(a)
        net = copy.deepcopy(gm).double()
        quotients = (net(a) - net(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert 0 < float(quotients.max()) <= cert.bound < float("inf")


def test_eval_cache_follows_the_projectors():
    """The eval weight depends on the projector parameters besides ``weight``: changing them in
    place (an optimizer step under no_grad, a loaded state) must recompute it."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    p = bcop(conv, (6, 6))
    conv.eval()
    before = conv.weight.clone()
    with torch.no_grad():
        p.projectors.add_(0.5)
    after = conv.weight
    assert not torch.allclose(before, after)
    fresh = copy.deepcopy(conv)
    fresh.parametrizations.weight[0].clear_cache()
    torch.testing.assert_close(after, fresh.weight)


def test_orthogonal_buffers_stay_wide_and_the_model_saves(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    gm = lipfx.convert(small_cnn(), x[:1], separable=None, constraint="orthogonal")
    p = gm.get_submodule("2").parametrizations.weight[0]
    half = copy.deepcopy(gm).half()
    hp = half.get_submodule("2").parametrizations.weight[0]
    assert hp.base.dtype == hp.projector_base.dtype == torch.float32 and hp.projectors.dtype == torch.float16
    with torch.no_grad():
        p.projectors.normal_()
    assert_round_trip(gm, x, tmp_path / "net.pt")


@pytest.mark.parametrize("kind", ["aol-conv", "aol-linear", "bcop"])
def test_eval_network_is_the_trained_one(kind):
    """Kinds bounded by construction divide by max(certified bound, 1) in eval mode: an AOL
    layer whose true norm is well below 1 is not scaled up (found by an attack: outputs moved
    71% between modes), and the eval layer's norm is still <= K by dense SVD."""
    torch.manual_seed(1)
    if kind == "aol-linear":
        layer = nn.Linear(8, 8)
        parametrize.register_parametrization(layer, "weight", AOLNormalization(layer.weight, 1, 1.5, initialize=False))
        with torch.no_grad():
            layer.parametrizations.weight.original.normal_()
        x = torch.randn(4, 8)
        norm = lambda: float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))  # noqa: E731
    else:
        layer = nn.Conv2d(8, 8, 5, padding=2)
        p = (AOLConvNormalization if kind == "aol-conv" else OrthogonalConvNormalization)(layer, [(6, 6)], 1.5)
        parametrize.register_parametrization(layer, "weight", p)
        with torch.no_grad():
            for t in layer.parameters():
                t.normal_()
        x = torch.randn(4, 8, 6, 6)
        norm = lambda: float(torch.linalg.svdvals(dense(layer, layer.weight.detach(), (6, 6))).max())  # noqa: E731
    train_norm = norm()
    if kind != "bcop":
        assert train_norm < 0.95 * 1.5  # the case that matters: the construction is loose here
    with torch.no_grad():
        trained = layer(x)
        layer.eval()
        evaluated = layer(x)
    # the same up to the rounding margin (a bound of 1 times 1 + delta, delta ~ 2e-5 for 5x5 taps)
    assert float((evaluated - trained).norm() / trained.norm()) < 5e-5
    assert norm() <= 1.5


def test_eval_gradient_reaches_the_projectors_of_a_frozen_kernel():
    """With the raw weight frozen, eval mode must still give the projectors a gradient (it
    returned the cached no-grad weight: found by an attack)."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    p = bcop(conv, (6, 6))
    conv.parametrizations.weight.original.requires_grad_(False)
    conv.eval()
    conv(torch.randn(2, 4, 6, 6)).square().sum().backward()
    assert p.projectors.grad is not None and float(p.projectors.grad.abs().max()) > 0


def test_unpadded_reflect_conv_is_a_zero_padded_one():
    assert gnp_conv_reason(conv_geometry(nn.Conv2d(4, 4, 3, padding=0, padding_mode="reflect"), "c")) is None
