"""layer_bound is never below the true operator norm (dense SVD of the explicit matrix)."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import dense_norm
from torch import nn

import lipfx
from lipfx.norms import layer_bound

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODES = ["zeros", "circular", "reflect", "replicate"]
MAX_DENSE = 1200  # inputs * outputs kept small enough for an exact SVD


def _channels(kind: str) -> tuple[int, int, int]:
    """(in, out, groups) for depthwise, channel-multiplier, grouped and full convs."""
    return {"depthwise": (3, 3, 3), "multiplier": (2, 6, 2), "grouped": (4, 6, 2), "full": (2, 3, 1)}[kind]


@st.composite
def conv_cases(draw):
    d = draw(st.sampled_from([1, 2, 3]))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["depthwise", "multiplier", "grouped", "full"]))
    mode = draw(st.sampled_from(MODES))
    cin, cout, groups = _channels(kind)
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    ke = dilation * (k - 1) + 1
    max_n = {1: 12, 2: 7, 3: 4}[d]
    n = tuple(draw(st.integers(min(max(ke - 2, 2), max_n), max_n)) for _ in range(d))
    if padding == "same" and stride > 1:
        padding = "int"  # torch forbids 'same' with stride
    if padding == "int":
        pad = draw(st.integers(0, k))
    elif padding == "tuple":
        pad = tuple(draw(st.integers(0, k)) for _ in range(d))
    else:
        pad = padding
    return d, dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=stride, dilation=dilation,
                   groups=groups, padding=pad, padding_mode=mode), n


def _check(d, kwargs, n):
    module = CONV[d](**kwargs).double()
    shape = (kwargs["in_channels"],) + tuple(n)
    try:
        out = module(torch.zeros(1, *shape, dtype=torch.float64))
    except RuntimeError:
        return None  # torch itself rejects this combination (e.g. reflect pad >= size)
    if out.numel() * torch.Size(shape).numel() > MAX_DENSE * 200:
        return None
    true = dense_norm(module, shape)
    bound = layer_bound(module, shape)
    free = layer_bound(module, None)
    assert bound >= true, f"{module} at {n}: bound {bound} < true {true}"
    assert free >= bound * (1 - 1e-12), f"{module} at {n}: resolution-free {free} < bound {bound}"
    return bound / max(true, 1e-300)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_conv_bound_is_sound_property(case):
    _check(*case)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["depthwise", "multiplier", "grouped", "full"])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)])
def test_conv2d_bound_is_sound_grid(mode, kind, stride, dilation):
    cin, cout, groups = _channels(kind)
    checked = 0
    for k, n in itertools.product([1, 2, 3, 5], [5, 6, 7, 8]):
        for pad in sorted({0, k // 2, k - 1}):
            kwargs = dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=stride,
                          dilation=dilation, groups=groups, padding=pad, padding_mode=mode)
            checked += _check(2, kwargs, (n, n)) is not None
    assert checked > 20


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_conv1d_conv3d_bounds_are_sound(d, mode):
    sizes = {1: [(7,), (8,), (13,)], 3: [(4, 4, 4), (5, 4, 3)]}[d]
    for n, stride, k in itertools.product(sizes, [1, 2], [2, 3]):
        for kind in ["depthwise", "full"]:
            cin, cout, groups = _channels(kind)
            kwargs = dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=stride,
                          groups=groups, padding=1, padding_mode=mode)
            _check(d, kwargs, n)


def test_linear_bound_is_exact_and_sound():
    lin = nn.Linear(7, 5).double()
    true = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    bound = layer_bound(lin, (7,))
    assert true <= bound <= true * (1 + 1e-8)
    assert layer_bound(lin, (3, 7)) == bound  # leading dims are batch-like
    assert layer_bound(lin, None) == bound


def test_circular_unit_stride_is_exact():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular").double()
    true = dense_norm(conv, (3, 8, 8))
    assert true <= layer_bound(conv, (3, 8, 8)) <= true * (1 + 1e-8)


def test_pointwise_is_the_matrix_norm_at_any_resolution_and_stride():
    conv = nn.Conv2d(6, 5, 1, stride=2).double()
    matrix = float(torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2))
    for n in (4, 9):
        true = dense_norm(conv, (6, n, n))
        assert abs(true - matrix) < 1e-10
        assert matrix <= layer_bound(conv, (6, n, n)) <= matrix * (1 + 1e-8)


def test_methods_are_sound_and_ordered():
    conv = nn.Conv2d(4, 4, 3, padding=1, stride=2).double()
    shape = (4, 8, 8)
    true = dense_norm(conv, shape)
    auto = layer_bound(conv, shape)
    for method in ["fft", "paper", "singla-feizi", "resolution-free"]:
        assert layer_bound(conv, shape, method=method) >= auto * (1 - 1e-12) >= true
    # the paper's bound ignores the stride: clearly looser on a strided layer
    assert layer_bound(conv, shape, method="paper") > 1.05 * auto


def test_singla_feizi_matches_paper_formula():
    conv = nn.Conv2d(3, 5, (3, 2), bias=False).double()
    w = conv.weight.detach()
    r = w.permute(0, 2, 1, 3).reshape(5 * 3, -1)  # the paper's numpy snippet
    expected = (3 * 2) ** 0.5 * float(torch.linalg.matrix_norm(r, ord=2))
    got = layer_bound(conv, None, method="singla-feizi")
    assert got <= expected * (1 + 1e-8)  # min(||R||, ||S||) <= ||R||
    assert got >= dense_norm(conv, (3, 6, 6))


class TestErrors:
    def test_unsupported_module_names_it(self):
        with pytest.raises(lipfx.UnsupportedModuleError, match="ConvTranspose2d"):
            layer_bound(nn.ConvTranspose2d(2, 2, 3), (2, 5, 5))
        with pytest.raises(lipfx.UnsupportedModuleError, match="'head.act'"):
            layer_bound(nn.ReLU(), (3,), name="head.act")

    def test_wrong_channels(self):
        with pytest.raises(lipfx.ShapeError, match="expects 3 input channels"):
            layer_bound(nn.Conv2d(3, 4, 3), (4, 8, 8))

    def test_wrong_rank(self):
        with pytest.raises(lipfx.ShapeError, match="without batch dim"):
            layer_bound(nn.Conv2d(3, 4, 3), (1, 3, 8, 8))

    def test_input_smaller_than_kernel(self):
        with pytest.raises(lipfx.ShapeError, match="smaller than the"):
            layer_bound(nn.Conv2d(3, 4, 5), (3, 3, 3))

    def test_linear_features(self):
        with pytest.raises(lipfx.ShapeError, match="last input dim 4"):
            layer_bound(nn.Linear(4, 2), (5,))

    def test_unknown_method(self):
        with pytest.raises(ValueError, match="unknown method"):
            layer_bound(nn.Linear(4, 2), (4,), method="guess")

    def test_singla_feizi_needs_2d(self):
        with pytest.raises(lipfx.UnsupportedModuleError, match="Conv2d only"):
            layer_bound(nn.Conv1d(2, 2, 3), (2, 9), method="singla-feizi")


def _with_singular_values(s: torch.Tensor, m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64, generator=gen))
    return (u * s) @ v.T


@pytest.mark.parametrize("case", ["gaussian-wide", "gaussian-tall", "low-rank", "near-tie", "flat",
                                  "separable-pointwise", "small-near-tie", "small-flat", "smallest", "tiny"])
def test_large_matrix_certificate_against_svd(case):
    """Matrices with both sides >= 64 take the Gram + estimate + Cholesky path, not an SVD
    (eigvalsh estimates up to Gram side 1024, LOBPCG beyond); "smallest" is the first size on
    that path, "tiny" the last on the SVD's."""
    from lipfx.norms.conv import matrix_norm

    gen = torch.Generator().manual_seed(0)
    matrices = {
        # the pointwise half of an exact separable 3x3 conv, 512 -> 512 channels (ResNet's layer4)
        "separable-pointwise": lambda: torch.randn(512, 4608, dtype=torch.float64, generator=gen) / 70,
        "small-near-tie": lambda: _with_singular_values(torch.linspace(1, 0.5, 64, dtype=torch.float64).index_fill(
            0, torch.tensor([1]), 1 - 1e-12), 64, 200, 4),
        "small-flat": lambda: _with_singular_values(torch.ones(70, dtype=torch.float64), 90, 70, 5),
        "smallest": lambda: torch.randn(64, 64, dtype=torch.float64, generator=gen),
        "tiny": lambda: torch.randn(63, 300, dtype=torch.float64, generator=gen) * 1e-3,
        "gaussian-wide": lambda: torch.randn(600, 1500, dtype=torch.float64, generator=gen) / 30,
        "gaussian-tall": lambda: torch.randn(1300, 700, dtype=torch.float64, generator=gen),
        "low-rank": lambda: _with_singular_values(torch.tensor([5.0, 2.0, 1e-3], dtype=torch.float64), 700, 600, 1),
        # two top singular values 1e-9 apart: the power estimate cannot tell them apart
        "near-tie": lambda: _with_singular_values(torch.linspace(1, 0.5, 520, dtype=torch.float64).index_fill(
            0, torch.tensor([1]), 1 - 1e-9), 600, 520, 2),
        "flat": lambda: _with_singular_values(torch.ones(530, dtype=torch.float64), 530, 640, 3),
    }
    w = matrices[case]()
    exact = float(torch.linalg.matrix_norm(w, ord=2))
    bound = matrix_norm(w)
    assert exact <= bound <= exact * (1 + 1e-4), (case, bound / exact - 1)


def test_bounds_that_are_subnormal_are_rounded_up():
    """A bound taken on the operator scaled up by 2^k and scaled back rounds when the result is
    subnormal: two entries of 2^-1074 once gave 2^-1074 for a norm of sqrt(2) x 2^-1074."""
    from lipfx.norms.conv import matrix_norm

    tiny = 2.0 ** -1074
    for shape in [(1, 2), (64, 64)]:
        m = torch.zeros(shape, dtype=torch.float64)
        m[0, :2] = tiny
        assert matrix_norm(m) >= 2 * tiny  # sqrt(2) tiny is not representable: the next one up
    conv = nn.Conv1d(1, 1, 2, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(tiny)  # [tiny, tiny] at length 2: one output, norm sqrt(2) tiny
    assert layer_bound(conv, (1, 2)) >= 2 * tiny


def test_gram_estimates_of_huge_matrices_converge():
    """Gram side > 1024 takes a LOBPCG estimate; on entries near 2^299 (left unscaled by
    scale_invariant) it raised 'failed to converge' or returned 0 before G was scaled for it."""
    from lipfx.norms.conv import matrix_norm

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1030, 1030, dtype=torch.float64, generator=gen)
    w = w / w.abs().max() * 2.0 ** 299
    exact = float(torch.linalg.matrix_norm(w / 2.0 ** 299, ord=2)) * 2.0 ** 299
    assert exact <= matrix_norm(w) <= exact * (1 + 1e-4)
