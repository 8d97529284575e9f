"""Spectral normalization (issue 4): every normalized layer's true norm stays <= K."""

import copy
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import lipfx
from lipfx.layers import ChannelAffine
from lipfx.norms import operator_norm
from lipfx.norms.estimators import WARM_MIX, generic_vector
from lipfx.normalization import ConvNormalization, DiagonalNormalization, MatrixNormalization, normalized_layers

from test_convert import randomize_batchnorm

ROOT = Path(__file__).resolve().parents[1]


def true_norm(module: nn.Module, p, input_shape) -> float:
    """The layer's norm with the weight it uses now, in float64: exact SVD of the matrix for
    linear/1x1 layers, of each channel's dense operator for depthwise convs, power iteration on
    the real operator for other convs; max |scale| for ChannelAffine."""
    with torch.no_grad():
        w = getattr(module, "scale" if isinstance(p, DiagonalNormalization) else "weight").detach().double()
    if isinstance(p, DiagonalNormalization):
        return float(w.abs().max())
    if isinstance(p, MatrixNormalization):
        blocks = w.reshape(p.groups, w.shape[0] // p.groups, -1)
        return float(torch.linalg.matrix_norm(blocks, ord=2).max())
    conv = copy.deepcopy(module)
    fn = lambda x: conv._conv_forward(x, w, None)  # noqa: E731  (linear part, float64)
    channels, spatial = input_shape[0], input_shape[1:]
    if conv.groups == channels and math.prod(spatial) <= 1024:
        # depthwise: block diagonal over input channels; push a basis through every channel at once
        n = math.prod(spatial)
        basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, *spatial).expand(n, channels, *spatial)
        out = fn(basis.contiguous()).reshape(n, channels, -1)  # (basis, C, r * outputs)
        return float(torch.linalg.matrix_norm(out.permute(1, 2, 0), ord=2).max())
    return operator_norm(fn, (1, *input_shape), iters=3000, tol=1e-13)


def layer_inputs(net: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes = {}

    def hook(name):
        def record(module, args):
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return record

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m, _ in normalized_layers(net)]
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


def sgd_steps(net: nn.Module, x: torch.Tensor, steps: int = 4, lr: float = 0.5) -> None:
    """A few large steps on a made-up target, so the weights move far between forwards."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    target = torch.randn_like(net(x))
    for _ in range(steps):
        opt.zero_grad()
        out = net(x)
        loss = (out / out.detach().abs().mean().clamp_min(1e-6) - target).square().mean()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow), "mobilenet_v2"])
@pytest.mark.parametrize("lr, train_slack", [(0.05, 1e-3), (0.5, 0.1)])
def test_every_layer_stays_below_K_after_large_sgd_steps(name, lr, train_slack, zoo):
    """Eval mode: every layer's true norm <= K exactly. Training mode runs a fixed number of
    warm power steps per step (no host-side stopping rule): within 1e-3 of K after large steps
    (lr 0.05), and lagging by at most 10% right after steps that move the weights far (lr 0.5;
    measured 8.5% on MobileNetV2, 3.5% on ResNet-18; docs/math.md 5.2)."""
    model = zoo.shared(name, num_classes=10)  # convert copies it
    x = torch.randn(4, 3, 32, 32)
    K = 2.0
    net = lipfx.convert(model, x, K=K)
    shapes = layer_inputs(net, x[:1])
    before = {n: m.parametrizations.weight.original.detach().clone()
              for n, m, p in normalized_layers(net) if not isinstance(p, DiagonalNormalization)}
    sgd_steps(net, x, lr=lr)
    layers = list(normalized_layers(net))
    assert len(layers) == len(shapes) > 30
    moved = [n for n, m, p in layers if n in before and not torch.equal(before[n], m.parametrizations.weight.original)]
    assert len(moved) >= 0.9 * len(before)  # the optimiser really changed the weights
    kinds = {type(p) for _, _, p in layers}
    assert {ConvNormalization, MatrixNormalization} <= kinds
    net.train()
    worst_train = max(true_norm(m, p, shapes[n]) / K for n, m, p in layers)
    net.eval()
    worst_eval = max(true_norm(m, p, shapes[n]) / K for n, m, p in layers)
    assert worst_train <= 1 + train_slack, worst_train
    assert worst_eval <= 1.0, worst_eval
    assert worst_eval > 0.9  # normalization targets K, it does not merely stay below it


def test_every_layer_kind_on_a_small_net_against_dense_svd():
    """Strided, dilated, grouped, circular-padded and full (un-rewritten) convs, 1-D and 3-D,
    ChannelAffine: eval norms <= K against the dense matrix of each layer."""
    from reference import dense_norm

    cases = [
        (nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, dilation=2, groups=3)), (3, 9, 9), "exact"),
        (nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular"), nn.Conv2d(5, 4, 2, stride=2)), (3, 6, 6), None),
        (nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 4, 1, groups=2)), (2, 12), "exact"),
        (nn.Sequential(nn.Conv3d(1, 3, 3, padding=1, stride=(1, 2, 2))), (1, 4, 6, 6), "exact"),
        (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), (3, 5, 5), "exact"),
    ]
    for model, shape, separable in cases:
        torch.manual_seed(0)
        model = model.double().eval()
        randomize_batchnorm(model)
        x = torch.randn(2, *shape, dtype=torch.float64)
        net = lipfx.convert(model, x, K=1.5, separable=separable)
        sgd_steps(net, x, steps=2, lr=0.3)
        shapes = layer_inputs(net, x[:1])
        net.eval()
        layers = list(normalized_layers(net))
        assert layers
        for name, m, p in layers:
            if isinstance(p, DiagonalNormalization):
                got = float(m.scale.abs().max())
            else:
                got = dense_norm(_linear(m), shapes[name])
            assert got <= 1.5 * (1 + 1e-12), (name, got)
            assert got >= 1.5 / 3, (name, got)  # tight enough to matter (1x1 outputs here are the loosest case)
        if separable is None:
            assert any(isinstance(p, ConvNormalization) and p.groups == 1 for _, _, p in layers)
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and separable:
            assert any(isinstance(m, ChannelAffine) for _, m, _ in layers)


CONV_TRAIN_CASES = [  # (conv, input size): depthwise (exact blocks) and dense (power-iterated blocks)
    (nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect"), (9, 9)),  # 1x1 blocks, ||P||
    (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (9, 8)),  # polyphase: 1x4 rows
    (nn.Conv2d(3, 3, 3, groups=3, dilation=2), (7, 8)),  # dilated
    (nn.Conv2d(4, 12, 3, stride=2, padding=1, groups=4), (15, 15)),  # dense 3x4 blocks
    (nn.Conv1d(3, 5, 4, padding=2), (11,)),  # dense
]


def test_conv_training_bound_tracks_the_fft_bound_at_every_step():
    """Every training step searches the whole spectrum (docs/math.md, 7.3). Against the
    certificate's float64 circulant bound on the same grid (sections 1-3; times ||P|| on the
    padded input for reflect padding) and the dense SVD of the layer's operator: depthwise blocks
    give that bound itself at every step, so the value is above the true norm; dense blocks
    (estimates) stay within 1e-3 of it while the kernel moves, catching up within two steps after
    a large jump. A 2% mutation of either check fails."""
    from lipfx.norms.conv import zero_padded_grid
    from lipfx.norms.geometry import conv_geometry, padding_norm
    from lipfx.norms.spectral import max_transfer_norm, phase_stack
    from reference import dense_matrix

    torch.manual_seed(0)
    for conv, size in CONV_TRAIN_CASES:
        net = lipfx.convert(nn.Sequential(conv), torch.randn(1, conv.in_channels, *size), separable=None).double().train()
        m = net.get_submodule("0")
        p = m.parametrizations.weight[0]
        w = m.parametrizations.weight.original
        reflect = conv.padding_mode != "zeros"
        for step in range(12):
            with torch.no_grad():
                w.add_(torch.randn_like(w) * (0.3 if step == 6 else 1e-3))  # one large jump
            got = float(p.train_bound(w.detach(), gradient=False).value)
            with torch.no_grad():
                op = dense_matrix(lambda x: m._conv_forward(x, w, None), (conv.in_channels, *size))
                geom = conv_geometry(m, "conv")
                n, factor = size, 1.0
                if reflect:  # ||P|| (section 3.3) times the valid conv on the padded input
                    factor = padding_norm(conv.padding_mode, size, geom.pads)
                    n = tuple(k + lo + hi for k, (lo, hi) in zip(size, geom.pads))
                    geom = conv_geometry(nn.Conv2d(6, 6, 3, groups=6), "valid")
                grid = zero_padded_grid(geom, n)
                stacked = phase_stack(_dilate(w, conv.dilation), conv.groups, conv.stride)
                fft = factor * max_transfer_norm(stacked, tuple(g // s for g, s in zip(grid, conv.stride)))
            if not p.dense:
                assert got == pytest.approx(fft, rel=1e-7), (conv, step)  # fft carries a round-off margin
                assert float(torch.linalg.matrix_norm(op, ord=2)) <= got * (1 + 1e-9), (conv, step)
            elif step in (6, 7):  # the jump: the lift of 5.2 may overshoot (a smaller norm, not unsound)
                assert 0.9 * fft <= got <= 1.1 * fft, (conv, step, got / fft)
            else:  # an estimate, not a bound: within 1e-3 of the bound
                assert got == pytest.approx(fft, rel=1e-3), (conv, step, got / fft)


def test_blocks_built_from_taps_equal_the_fft_blocks():
    """block_at (a DFT written per tap, used for the gradient and the sweeps) and row_spectrum
    (cosine table) against rfftn of the phase-stacked kernel, for every block of each geometry."""
    from lipfx.norms.geometry import conv_geometry
    from lipfx.norms.training import block_at, row_spectrum, row_spectrum_basis, subgrid, tap_phases
    from reference import spectrum_blocks

    torch.manual_seed(0)
    for conv, size in CONV_TRAIN_CASES:
        conv = copy.deepcopy(conv).double()
        geom = conv_geometry(conv, "conv")
        grid = subgrid(geom, size)
        reference = spectrum_blocks(grid)
        steps, columns = tap_phases(grid.geometry)
        index = torch.arange(reference.shape[0])
        built = block_at(conv.weight.detach(), conv.groups, grid, index, steps, columns)
        torch.testing.assert_close(built, reference, rtol=1e-10, atol=1e-12)
        if min(reference.shape[1:]) == 1:
            pairs, cosines = row_spectrum_basis(grid)
            power = row_spectrum(conv.weight.detach(), conv.groups, pairs, cosines)
            torch.testing.assert_close(power, torch.view_as_real(reference).square().sum((-1, -2, -3)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv, size", [CONV_TRAIN_CASES[1], CONV_TRAIN_CASES[3]], ids=["depthwise", "dense"])
def test_swept_spectrum_stays_an_upper_bound_between_evaluations(conv, size, monkeypatch):
    """Spectra too large for every step are re-evaluated a few blocks per step, in turn and those
    with the largest bounds, the others bounded by their last value plus the tap drift since
    (docs/math.md, 7.4). Forced here with small budgets (3 to 4 steps per sweep), once with blocks
    in turn only and once with the largest refreshed too, on the same kernels: the value is never
    below the circulant bound (dense blocks: by more than 1e-3, their power-iterated estimates)
    and at most 2 x slack above it (dense blocks: plus 1e-2, their residual lift), the slack
    being what ``residual`` reports. In turn only, the
    slack is really used; refreshing the largest keeps the peak's mean slack at half of that or
    less, over four kernels."""
    import lipfx.normalization.layers as layers
    from lipfx.norms.conv import zero_padded_grid
    from lipfx.norms.geometry import conv_geometry
    from lipfx.norms.spectral import max_transfer_norm, phase_stack

    geom = conv_geometry(conv, "conv")
    sub = tuple(g // s for g, s in zip(zero_padded_grid(geom, size), conv.stride))
    blocks = conv.groups * math.prod(sub[:-1]) * (sub[-1] // 2 + 1)
    rows_taps = conv.out_channels // conv.groups * conv.in_channels // conv.groups + math.prod(conv.kernel_size)
    monkeypatch.setattr(layers, "ROW_BASIS_LIMIT", 0)
    monkeypatch.setattr(layers, "SWEEP_BUDGET", math.ceil(blocks / 3) * rows_taps * 2 * math.prod(conv.stride))
    mean = {False: 0.0, True: 0.0}  # the mean residual, summed over kernels
    for seed in range(4):  # kernels drawn here (the module-level case is drawn at import)
        torch.manual_seed(seed)
        kernel = copy.deepcopy(conv)
        kernel.reset_parameters()
        for top in (False, True):
            monkeypatch.setattr(layers, "SWEEP_TOP", 4 if top else 1 << 30)
            torch.manual_seed(0)
            net = lipfx.convert(nn.Sequential(copy.deepcopy(kernel)), torch.randn(1, conv.in_channels, *size),
                                separable=None).double().train()
            m = net.get_submodule("0")
            p = m.parametrizations.weight[0]
            w = m.parametrizations.weight.original
            assert 1 < p._chunks[0] < blocks and (p._tops[0] > 0) == top
            residuals = []
            for step in range(15):
                with torch.no_grad():
                    w.add_(torch.randn_like(w) * 3e-3)
                got = float(p.train_bound(w.detach(), gradient=False).value)
                stacked = phase_stack(_dilate(w.detach(), conv.dilation), conv.groups, conv.stride)
                fft = max_transfer_norm(stacked, sub)
                # dense blocks: power-iterated estimates, raised by their residual lift; depthwise: round-off
                low, high = (1e-3, 1e-2) if p.dense else (1e-7, 1e-7)
                assert fft * (1 - low) <= got <= fft * (1 + high) + 2 * float(p.residual) * got, (seed, top, step, got, fft)
                residuals.append(float(p.residual))
            mean[top] += sum(residuals) / len(residuals)
    assert mean[False] > 0  # the slack was really used
    # measured over these kernels: depthwise 0 against 0.15, dense 0.08 against 0.25 (one kernel in 8
    # tried was worse with the refresh: a stale block overtook the refreshed ones and kept the peak)
    assert mean[True] <= mean[False] / 2, mean


def test_swept_bound_survives_large_dilations_and_dtype_casts(monkeypatch):
    """Two ways a swept bound once fell below the FFT bound: float32 phase angles of taps far
    apart (a dilation of 257: now reduced exactly in integers), and a cast of the model between
    training forwards, which rounded the weight and the kernel the slack is measured from alike
    (now kept at float32 or more, so the cast shows up as drift)."""
    import lipfx.normalization.layers as layers
    from lipfx.norms.conv import zero_padded_grid
    from lipfx.norms.geometry import conv_geometry
    from lipfx.norms.spectral import max_transfer_norm, phase_stack

    def fft_bound(conv, w, size):
        geom = conv_geometry(conv, "conv")
        sub = tuple(g // s for g, s in zip(zero_padded_grid(geom, size), conv.stride))
        return max_transfer_norm(phase_stack(_dilate(w.detach().double(), conv.dilation), conv.groups, conv.stride), sub)

    torch.manual_seed(0)
    monkeypatch.setattr(layers, "ROW_BASIS_LIMIT", 0)  # swept, float32
    conv = nn.Conv1d(1, 1, 5, dilation=257, padding=514, bias=False)
    net = lipfx.convert(nn.Sequential(conv), torch.randn(1, 1, 4001), separable=None).train()
    p, w = net.get_submodule("0").parametrizations.weight[0], net.get_submodule("0").parametrizations.weight.original
    assert p._chunks[0] is not None
    assert float(p.train_bound(w.detach(), gradient=False).value) >= fft_bound(conv, w, (4001,)) * (1 - 5e-7)

    monkeypatch.setattr(layers, "SWEEP_BUDGET", 1)  # one block per step
    for dtype in (torch.float16, torch.bfloat16):
        for trial in range(10):
            conv = nn.Conv1d(1, 1, 4, padding=2, bias=False)
            net = lipfx.convert(nn.Sequential(conv), torch.randn(1, 1, 64), separable=None).train()
            net(torch.randn(1, 1, 64))  # one training step: the cursor moves on
            net.to(dtype)  # a cast between training forwards
            m = net.get_submodule("0")
            p, w = m.parametrizations.weight[0], m.parametrizations.weight.original
            got = float(p.train_bound(w.detach(), gradient=False).value)
            assert got >= fft_bound(conv, w, (64,)) * (1 - 5e-7), (dtype, trial)


def _dilate(w: torch.Tensor, dilation) -> torch.Tensor:
    """The kernel with dilation - 1 zeros between taps (what the conv applies)."""
    shape = w.shape[:2] + tuple(d * (k - 1) + 1 for k, d in zip(w.shape[2:], dilation))
    out = w.new_zeros(shape)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)] = w
    return out


GRADIENT_CASES = [  # (layer, input shape): every path of the training bound's closed-form gradient
    (nn.Linear(7, 5), (7,)),
    (nn.Conv2d(8, 6, 1, groups=2), (8, 5, 5)),  # grouped pointwise: the gradient sits in one group
    (nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 7, 7)),  # depthwise: 1x1 blocks
    (nn.Conv2d(4, 12, 3, stride=2, padding=1, groups=4), (4, 9, 9)),  # polyphase 3x4 blocks
    (nn.Conv2d(6, 6, 3, dilation=2, groups=3), (6, 9, 9)),  # dilated 2x2 blocks
    (nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="reflect"), (3, 6, 6)),  # ||P|| factor
    (nn.Conv2d(3, 5, 2, stride=2), (3, 6, 6)),  # taps wrap on a small subgrid
    (nn.Conv1d(2, 4, 5, padding=2), (2, 12)),
    (nn.Conv3d(1, 3, 3, padding=1, stride=(1, 2, 2)), (1, 4, 6, 6)),
    (nn.BatchNorm2d(3), (3, 4, 4)),  # ChannelAffine
]


@pytest.mark.parametrize("scaling", ["hard", "soft"])
def test_training_gradient_matches_finite_differences(scaling):
    """The hand-written backward (closed-form gradient of the bound at its argmax block) against
    central differences of the training forward itself, in float64, with the bound recomputed
    exactly at every call (power iteration run to convergence)."""
    for layer, shape in GRADIENT_CASES:
        torch.manual_seed(0)
        for m in layer.modules():  # the same weights whatever ran before (the list is built at import)
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        model = nn.Sequential(layer).double().eval()
        randomize_batchnorm(model)
        net = lipfx.convert(model, torch.randn(1, *shape, dtype=torch.float64), K=1.7, scaling=scaling,
                            s_init=0.8, separable=None).double().train()  # K and s too
        [(name, host, p)] = list(normalized_layers(net))
        plist = getattr(host.parametrizations, "scale" if isinstance(p, DiagonalNormalization) else "weight")
        w = plist.original
        if isinstance(p, (MatrixNormalization, ConvNormalization)):
            p.power_iters = 3000  # converged: the bound is the same function at every call
            p.train_bound(w.detach())
        g = torch.randn_like(w)
        direction = torch.randn_like(w)

        def f(weight):
            return float((plist[0](weight) * g).sum())

        out = (plist[0](w) * g).sum()
        params = [w] + ([p.s] if p.s is not None else [])
        grads = torch.autograd.grad(out, params)
        h = 1e-6
        with torch.no_grad():
            numeric = (f(w + h * direction) - f(w - h * direction)) / (2 * h)
        assert float((grads[0] * direction).sum()) == pytest.approx(numeric, rel=1e-5, abs=1e-8), (layer, scaling)
        if p.s is not None:
            with torch.no_grad():
                s0 = p.s.clone()
                p.s.copy_(s0 + h)
                up = f(w)
                p.s.copy_(s0 - h)
                down = f(w)
                p.s.copy_(s0)
            assert float(grads[1]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8), layer


def test_gradient_penalty_trains_through_the_normalization():
    """A WGAN-GP critic: the penalty's gradient reaches the weights through the normalization
    (a double backward through the convs, first order through the bound), and equals the
    gradient of the same critic written with a differentiable exact norm."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    net = lipfx.convert(critic, x[:1].detach(), K=1.3).train()
    for _, _, p in normalized_layers(net):
        p.power_iters = 5000

    def penalty(forward):
        (gx,) = torch.autograd.grad(forward(x).sum(), x, create_graph=True)
        return (gx.norm(dim=1) - 1).square().mean()

    ours = dict(zip(["0", "2"], torch.autograd.grad(penalty(net), [net.get_submodule(n).parametrizations.weight.original for n in ("0", "2")])))
    weights = [net.get_submodule(n).parametrizations.weight.original.detach().clone().requires_grad_(True) for n in ("0", "2")]
    biases = [net.get_submodule(n).bias for n in ("0", "2")]

    def reference(inp):
        w0, w2 = (w * 1.3 / torch.linalg.matrix_norm(w, ord=2) for w in weights)
        return torch.tanh(inp @ w0.T + biases[0]) @ w2.T + biases[1]

    ref = torch.autograd.grad(penalty(reference), weights)
    for (name, got), want in zip(ours.items(), ref):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), name


def test_batched_forward_gives_the_per_layer_results(tmp_path):
    """normalize(batched=True) computes all weights when the forward starts; training steps must
    give the very same weights and state as computing each weight at its layer, including a
    layer called twice in one forward and a forward that raises half-way."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.head(torch.relu(self.conv(torch.relu(self.conv(x)))).flatten(1))

    torch.manual_seed(0)
    x = torch.randn(5, 4, 6, 6)
    a = lipfx.convert(Shared(), x, K=1.2)
    b = lipfx.convert(Shared(), x, K=1.2, batched=False)
    b.load_state_dict(a.state_dict())
    assert a._forward_pre_hooks and not b._forward_pre_hooks
    for net in (a, b):
        torch.manual_seed(1)  # the same made-up target
        sgd_steps(net, x, steps=3, lr=0.2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and same(va, vb), ka
    seen = []  # the layers really take the weights computed when the forward started
    hook = a.head.register_forward_pre_hook(lambda m, args: seen.append(m.parametrizations.weight[0]._prepared))
    a(x)
    hook.remove()
    assert seen[0] is not None and all(p._prepared is None for _, _, p in normalized_layers(a))
    with pytest.raises(RuntimeError):
        a(torch.randn(5, 3, 6, 6))  # wrong channel count: fails inside the graph
    assert all(p._prepared is None for _, _, p in normalized_layers(a))
    # batching survives what drops forward hooks (GraphModule deepcopy, pickling), not bake
    from lipfx.normalization import is_batched

    assert is_batched(copy.deepcopy(a)) and not is_batched(copy.deepcopy(b))
    lipfx.save(a, tmp_path / "a.pt")
    assert is_batched(lipfx.load(tmp_path / "a.pt"))
    baked = lipfx.bake(a)
    assert not baked._forward_pre_hooks and not baked._forward_hooks and not baked._deepcopy_hooks
    a.train()
    with torch.no_grad():
        assert torch.equal(a(x), b.train()(x))


def test_batched_depthwise_bounds_are_each_layers_own():
    """Depthwise layers bounded from cosine tables share one batch (``batch_key``): their gram
    vectors in one tensor, one matmul per geometry. Each layer must still get its own exact FFT
    bound (the certificate's float64 circulant bound, an independent computation) and the
    weights and gradients the per-layer path gives: layers of different group counts, strides,
    dilations and input sizes, with a strong and a weak layer side by side (a peak taken over the
    whole batch instead of per layer would give the weak one the strong one's bound)."""
    from lipfx.normalization import batching

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16))
    with torch.no_grad():
        net[2].weight.mul_(20.0)  # the strong layer
    gm = lipfx.convert(net, torch.randn(1, 8, 12, 12), K=1.0, separable=None).train()
    pairs = [(p, w) for p, w in batching._first_normalizations(gm) if isinstance(p, ConvNormalization)]
    keys = {p.batch_key(w) for p, w in pairs}
    assert len(pairs) == 4 and len(keys) == 1 and None not in keys
    grads = [torch.randn(w.shape) for _, w in pairs]
    batched = type(pairs[0][0]).train_forwards(pairs)
    got = torch.autograd.grad(batched, [w for _, w in pairs], grads)
    alone = [p._train_forward(w) for p, w in pairs]
    want = torch.autograd.grad(alone, [w for _, w in pairs], grads)
    for (p, w), b, a, gb, ga in zip(pairs, batched, alone, got, want):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
        exact = p.exact_bound(w.detach())
        bound = float(p.train_bound(w.detach(), gradient=False).value)
        assert abs(bound - exact) <= 1e-5 * exact, (p.name, bound, exact)
        # the normalized weight is w / bound: its own exact bound is 1
        assert abs(p.exact_bound(b.detach()) - 1.0) <= 1e-5, p.name


def test_batched_depthwise_bounds_at_several_sizes_are_each_layers_own():
    """Layers used at several input sizes share a batch with layers used at one: the batch
    orders its (layer, size) entries by cosine table, so a layer's sizes land apart and the
    order differs from the layers'. Each layer must still get the largest of its own sizes'
    float64 circulant bounds (the certificate's computation; reflect padding bounded through
    ||P||, never below it) and the weights and gradients of the same layer computed alone. A
    strong layer shares the table of a weak layer's second size and a weak layer's first size is
    its largest, so an entry read from the wrong layer or size shows in the values."""
    from lipfx.norms.conv import conv_bound
    from lipfx.norms.geometry import conv_geometry

    torch.manual_seed(0)
    made = [(nn.Conv2d(5, 5, 3, padding=1, groups=5), [(7, 7), (12, 9)], 1.0),
            (nn.Conv2d(3, 3, 3, padding=1, groups=3), [(12, 9)], 20.0),
            (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, padding_mode="reflect"), [(9, 9), (6, 6)], 3.0),
            (nn.Conv2d(6, 6, 3, padding=1, groups=6), [(7, 7)], 0.5),
            (nn.Conv2d(1, 1, 3, padding=1), [(5, 5), (7, 7)], 2.0)]
    convs, layers = [], []
    for conv, sizes, gain in made:
        conv = conv.double()
        with torch.no_grad():
            conv.weight.mul_(gain)
        p = ConvNormalization(conv, sizes, K=1.3).double().train()
        convs.append((conv, sizes))
        layers.append((p, nn.Parameter(conv.weight.detach().clone())))
    keys = {p.batch_key(w) for p, w in layers}
    assert len(keys) == 1 and None not in keys
    grads = [torch.randn(w.shape, dtype=torch.float64) for _, w in layers]
    batched = ConvNormalization.train_forwards(layers)
    got = torch.autograd.grad(batched, [w for _, w in layers], grads)
    alone = [p._train_forward(w) for p, w in layers]
    want = torch.autograd.grad(alone, [w for _, w in layers], grads)
    for (p, w), (conv, sizes), b, a, gb, ga in zip(layers, convs, batched, alone, got, want):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0)
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-14)
        exact = max(conv_bound(conv_geometry(conv, ""), n, "") for n in sizes)
        used = float(w.detach().norm() * p.scale() / b.detach().norm())  # the bound each weight was divided by
        if conv.padding_mode == "zeros":
            assert used == pytest.approx(exact, rel=1e-9), sizes
        else:
            assert exact * (1 - 1e-9) <= used <= exact * 1.5, sizes


def _linear(conv: nn.Module) -> nn.Module:
    out = copy.deepcopy(conv)
    if getattr(out, "bias", None) is not None:
        out.bias = None
    return out


def test_soft_scaling_constant_is_K_tanh_s_and_s_learns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    x = torch.randn(4, 3, 6, 6)
    net = lipfx.convert(model, x, K=3.0, scaling="soft", s_init=0.4)
    layers = list(normalized_layers(net))
    for _, _, p in layers:
        assert p.constant() == pytest.approx(3.0 * math.tanh(0.4), rel=1e-6)
    net.train()
    net(x).square().sum().backward()
    assert all(p.s.grad is not None and p.s.grad.abs() > 0 for _, _, p in layers)
    net.eval()
    with torch.no_grad():
        lin = net.get_submodule("3")
        assert float(torch.linalg.matrix_norm(lin.weight.double(), ord=2)) == pytest.approx(3.0 * math.tanh(0.4), rel=1e-5)
    assert "soft K*tanh(s)" in str(net)


def test_eval_caches_until_the_weights_change():
    torch.manual_seed(0)
    net = lipfx.convert(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)), torch.randn(1, 5), K=2.0).eval()
    lin = net.get_submodule("0")
    with torch.no_grad():
        first = lin.weight
        assert lin.weight is first  # cached: no per-call work in inference
        lin.parametrizations.weight.original.mul_(3.0)  # in place, as an optimiser step does
        second = lin.weight
    assert second is not first
    assert float(torch.linalg.matrix_norm(second.double(), ord=2)) <= 2.0
    # with gradients on (an attack on the input, or fine-tuning in eval mode) weights still get them
    lin.weight.sum().backward()
    assert lin.parametrizations.weight.original.grad is not None


def test_K_patterns_and_callables():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(1, 3, 4, 4)
    net = lipfx.convert(model, x, K={"0": 3.0, "2.depthwise": None, "*": 0.5})
    consts = {n: p.constant() for n, _, p in normalized_layers(net)}
    # a pattern for the original conv name matches both halves of its separable pair
    assert consts == {"0.depthwise": 3.0, "0.pointwise": 3.0, "2.pointwise": 0.5, "4": 0.5}
    assert any(r.action == "not-normalized" and r.name == "2.depthwise" for r in net.lipfx_report.records)
    net = lipfx.convert(model, x, K=lambda name, m: 4.0 if isinstance(m, nn.Linear) else 1.0)
    assert {n: p.constant() for n, _, p in normalized_layers(net)}["4"] == 4.0
    lipfx.set_constants(net, 0.25)
    assert all(p.constant() == 0.25 for _, _, p in normalized_layers(net))
    with pytest.raises(lipfx.LipfxError, match="no K pattern matches layer '0.depthwise'"):
        lipfx.convert(model, x, K={"4": 1.0})
    for bad in (0.0, -1.0, math.inf, "2"):
        with pytest.raises(lipfx.LipfxError, match="positive finite"):
            lipfx.convert(model, x, K=bad)


def test_print_shows_where_normalization_sits():
    net = lipfx.convert(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)), torch.randn(1, 3, 9, 9), K=20)
    text = str(net)
    assert "ConvNormalization(K=20, hard, bound=fft@9x9)" in text
    assert "MatrixNormalization(K=20, hard, bound=power-iteration(2/step))" in text


@pytest.fixture(scope="module")
def trained(zoo):
    torch.manual_seed(0)
    model = zoo.shared("resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    net = lipfx.convert(model, x, K=1.5)
    sgd_steps(net, x, steps=2, lr=0.1)
    return net.eval(), x


def test_state_dict_round_trip_keeps_power_iteration_state(trained):
    net, x = trained
    state = net.state_dict()
    assert any(k.endswith("parametrizations.weight.0.v") for k in state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    other = lipfx.convert(torchvision.models.resnet18(num_classes=10).eval(), x, K=1.5)  # other weights
    other.load_state_dict(torch.load(buf))
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), net(x))
    other.train(), net.train()
    a, b = copy.deepcopy(net), copy.deepcopy(other)  # train forwards advance the state: compare copies
    assert torch.equal(a(x), b(x))
    net.eval()


def test_bake_gives_a_plain_model_with_identical_outputs_that_loads_without_lipfx(trained, tmp_path):
    net, x = trained
    before = copy.deepcopy(net.state_dict())
    layers = [(n, type(p)) for n, _, p in normalized_layers(net)]
    baked = lipfx.bake(net)
    with torch.no_grad():
        assert torch.equal(baked(x), net(x))
    assert not any(type(m).__module__.startswith("lipfx") for m in baked.modules())
    assert not any("Parametrized" in type(m).__name__ for m in baked.modules())
    # net itself is untouched and still normalized
    assert [(n, type(p)) for n, _, p in normalized_layers(net)] == layers and len(layers) > 30
    after = net.state_dict()
    assert before.keys() == after.keys() and all(same(before[k], after[k]) for k in before)
    path = tmp_path / "baked.pt"
    torch.save(baked, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(baked(x).detach(), tmp_path / "y.pt")
    code = (
        "import sys; sys.modules['lipfx'] = None\n"  # importing lipfx now fails
        "import torch\n"
        f"m = torch.load(r'{path}', weights_only=False)\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}'); y = torch.load(r'{tmp_path / 'y.pt'}')\n"
        "assert torch.equal(m(x), y)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    exported = torch.export.export(baked, (x,))
    assert torch.equal(exported.module()(x), baked(x))


def test_bake_inlines_channel_affine():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 5, 5)
    net = lipfx.convert(model, x, K=0.7).eval()
    baked = lipfx.bake(net)
    with torch.no_grad():
        assert torch.allclose(baked(x), net(x), atol=1e-6)
    torch.export.export(baked, (x,))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.block(h))


def test_torch_compile_gives_the_same_outputs():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    net = lipfx.convert(SmallResNet().eval(), x, K=1.5).eval()
    compiled = torch.compile(copy.deepcopy(net))
    with torch.no_grad():
        assert torch.allclose(compiled(x), net(x), rtol=1e-5, atol=1e-6)
    a, b = copy.deepcopy(net).train(), copy.deepcopy(net).train()
    assert torch.allclose(torch.compile(b)(x), a(x), rtol=1e-4, atol=1e-5)


def test_float64(zoo):
    model = zoo("mobilenet_v2", num_classes=10).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    net = lipfx.convert(model, x, K=1.0).eval()
    net32 = lipfx.convert(model.float(), x.float(), K=1.0).eval()
    with torch.no_grad():
        out = net(x)
        assert out.dtype == torch.float64
        assert torch.allclose(out.float(), net32(x.float()), rtol=1e-3, atol=1e-5)
    shapes = layer_inputs(net, x[:1])
    for name, m, p in list(normalized_layers(net))[:6]:
        assert true_norm(m, p, shapes[name]) <= 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_weight_is_rounded_once(dtype):
    """W * (scale / bound) for a bf16/fp16 weight is the float32 product rounded once to the
    dtype, in every training path (Rescale, RescaleMany, the no-gradient product): rounding the
    factor first and then the product put a bf16 layer's norm up to 1.004 K (two ulps' worth)."""
    from lipfx.normalization.rescale import Rescale, RescaleMany, TrainBound, rescaled

    u = torch.finfo(dtype).eps / 2
    torch.manual_seed(0)
    worst = 0.0
    for _ in range(20):
        w = torch.randn(8, 6).to(dtype).requires_grad_()
        scale = torch.ones(())
        bound = torch.rand(()) * 3 + 0.5
        left, right = torch.zeros(8, 1), torch.zeros(1, 6)
        exact = w.detach().double() * (scale.double() / bound.double())
        outs = [Rescale.apply(w, scale, bound, 0, left, right),
                RescaleMany.apply(1, [0], w, scale, bound, left, right)[0],
                rescaled(w.detach(), scale, TrainBound(bound, None), False)]
        for out in outs:
            assert out.dtype == dtype
            worst = max(worst, float(((out.detach().double() - exact).abs() / exact.abs().clamp_min(1e-30)).max()))
    assert worst <= u * (1 + 1e-6), worst  # correctly rounded from float32 (whose error is 2^-24)


@pytest.mark.slow
def test_budget_with_normalization_holds_through_training(zoo):
    model = zoo.shared("resnet18", num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    net = lipfx.convert(model, x, lipschitz=1.0)
    plain = lipfx.certificate(net, x, compose_linear=False, dense_max=0)
    assert 0.99 <= plain.bound <= 1.0  # the budget is used fully by the guaranteed bound
    assert net.lipfx_certificate.bound <= 1.0
    assert len(net.lipfx_report.by_action("budget")) == len(list(normalized_layers(net)))
    sgd_steps(net, x, steps=3, lr=0.5)
    assert lipfx.certificate(net, x).bound <= 1.0
    assert lipfx.certificate(net, x, compose_linear=False, dense_max=0).bound <= 1.0


def test_already_normalized_is_refused_and_zero_weights_are_safe():
    net = lipfx.convert(nn.Sequential(nn.Linear(3, 3)), torch.randn(1, 3))
    with pytest.raises(lipfx.LipfxError, match="already parametrized"):
        lipfx.normalize(net)
    zero = nn.Sequential(nn.Linear(3, 3))
    nn.init.zeros_(zero[0].weight)
    net = lipfx.convert(zero, torch.randn(1, 3))
    for train in (True, False):  # both modes (the tuple of net.train(), net.eval() was eval twice)
        net.train(train)
        assert net.training is train and net.get_submodule("0").parametrizations.weight[0].training is train
        assert torch.isfinite(net(torch.randn(2, 3))).all()
        assert torch.isfinite(net.get_submodule("0").weight).all()


def test_ddp_two_gloo_processes_stay_identical(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert states[0].keys() == states[1].keys()
    assert any(k.endswith(".v") for k in states[0])
    for k in states[0]:
        assert same(states[0][k], states[1][k]), k
    start = torch.load(tmp_path / "start.pt")
    assert any(not same(start[k], states[0][k]) for k in start)  # training happened


def test_pointwise_layers_computed_together_match_one_at_a_time(monkeypatch):
    """One-matrix pointwise and linear layers of a batched forward share one
    MatrixNormalization.train_forwards call (their power steps' vector work in foreach kernels):
    after SGD steps the weights, power-iteration vectors and residuals must be bitwise those of
    computing each layer at its own, for layers of many shapes, soft and hard scaling, float32
    and half-precision weights, a frozen weight, a grouped 1x1 conv (computed at its own) and a
    spatial conv between them."""

    def build(scaling, dtype):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 24, 1), nn.ReLU(),
                              nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.Conv2d(24, 6, 1), nn.ReLU(),
                              nn.Conv2d(6, 12, 1, groups=2), nn.Flatten(), nn.Linear(12 * 5 * 5, 40), nn.ReLU(),
                              nn.Linear(40, 7))
        x = torch.randn(4, 3, 5, 5)
        nets = [lipfx.convert(model, x, K=1.3, scaling=scaling, s_init=0.7, separable=None, batched=b).to(dtype)
                for b in (True, False)]
        nets[1].load_state_dict(nets[0].state_dict())
        for net in nets:
            net.get_submodule("2").parametrizations.weight.original.requires_grad_(False)  # frozen: no Rescale
        return nets, x.to(dtype)

    calls = []
    real = MatrixNormalization.train_forwards.__func__
    monkeypatch.setattr(MatrixNormalization, "train_forwards",
                        classmethod(lambda cls, layers: calls.append(len(layers)) or real(cls, layers)))
    for scaling, dtype in (("hard", torch.float32), ("soft", torch.float32), ("hard", torch.bfloat16), ("soft", torch.float16)):
        (a, b), x = build(scaling, dtype)
        calls.clear()
        for net in (a, b):
            torch.manual_seed(1)
            sgd_steps(net, x, steps=3, lr=0.3)
        assert calls and set(calls) == {5}, calls  # 3 convs + 2 linears per forward, the grouped one apart
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and same(va, vb), (scaling, dtype, ka)
        for (_, _, pa), (_, _, pb) in zip(normalized_layers(a), normalized_layers(b)):
            assert torch.equal(pa.residual, pb.residual)
        a.train(), b.train()
        with torch.no_grad():
            assert torch.equal(a(x), b(x))
        # the guarantee of 5.2 holds for the layers computed together: sigma(W_used) <= K (1 + residual)
        with torch.no_grad():
            for name, host, p in normalized_layers(a):
                if isinstance(p, MatrixNormalization) and p.groups == 1:
                    w = host.weight.detach().double().reshape(host.weight.shape[0], -1)
                    rounding = 1 + 4 * torch.finfo(dtype).eps  # the used weight is rounded to its dtype
                    assert torch.linalg.matrix_norm(w, 2) <= abs(float(p.scale())) * (1 + float(p.residual)) * rounding, name


@pytest.mark.parametrize("batched", [True, False])
def test_one_power_step_gradient_uses_the_vector_it_was_taken_at(batched):
    """With power_iters=1 the bound is ||A v|| at the stored vector v, and its gradient factor
    must be that v, not the next iterate the state is then overwritten with (it once was: the
    factor aliased the state). Reference: autograd through W * K / (lift * ||W v||), v (the
    stored vector with the generic vector mixed in) and the lift held fixed. A layer called twice per forward and two forwards per backward work."""
    torch.manual_seed(0)
    net = lipfx.convert(nn.Sequential(nn.Linear(6, 5)), torch.randn(1, 6), K=1.5, power_iters=1, batched=batched).train()
    [(_, host, p)] = list(normalized_layers(net))
    w = host.parametrizations.weight.original
    with torch.no_grad():
        w.add_(torch.randn_like(w))  # far from the primed vector: v and the next iterate differ
    v0 = p.v[0].clone()
    g = torch.randn(5, 6)
    (grad,) = torch.autograd.grad((host.weight * g).sum(), w)
    assert not torch.allclose(p.v[0], v0)  # the state moved on
    lift = torch.sqrt(1 + p.residual)
    start = v0 + WARM_MIX * generic_vector(6, v0.dtype)  # the warm start with the generic vector mixed in
    start = start / start.norm()
    ref_w = w.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad((ref_w * 1.5 / (lift * torch.linalg.vector_norm(ref_w @ start)) * g).sum(), ref_w)
    assert torch.allclose(grad, ref, rtol=1e-5, atol=1e-7)
    x = torch.randn(3, 6)
    (net(x).sum() + net(x).square().sum()).backward()  # two forwards, one backward
    assert torch.isfinite(w.grad).all()


def test_warm_starts_leave_an_invariant_subspace():
    """A warm vector that is an exact lower singular vector of a block-diagonal weight would stay
    one forever (its residual is 0, so the lift does not help): found by an attack, the trained
    norm reached 5x K after a weight jump and 19-52x K under plain SGD on data confined to one
    feature. The generic vector mixed into every warm start (estimators.generic_vector) lets the
    top direction in. Against the dense SVD of the weight each layer really uses: a linear layer
    and a dense conv kept whole after a jump to a new top singular vector, and SGD at lr 0.5 that
    makes a once-tiny direction the top one."""
    from reference import dense_matrix

    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([2.0, 1.5, 0.1, 0.1])))
    net = lipfx.convert(nn.Sequential(lin), torch.randn(1, 4), K=1.0).train()
    m = net.get_submodule("0")
    with torch.no_grad():
        m.parametrizations.weight.original.copy_(torch.diag(torch.tensor([1.0, 0.5, 5.0, 0.1])))
    for _ in range(5):
        used = m.weight.detach().double()
    assert torch.linalg.matrix_norm(used, 2) <= 1 + 1e-3

    k = torch.tensor([[0.1, 0.2, 0.1], [0.2, 1.0, 0.2], [0.1, 0.2, 0.1]])
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.diag(torch.tensor([2.0, 1.5, 0.1, 0.1]))[:, :, None, None] * k)
    net = lipfx.convert(nn.Sequential(conv), torch.randn(1, 4, 6, 6), K=1.0, separable=None).train()
    m = net.get_submodule("0")
    assert m.parametrizations.weight[0].dense
    with torch.no_grad():
        m.parametrizations.weight.original.copy_(torch.diag(torch.tensor([1.0, 0.5, 5.0, 0.1]))[:, :, None, None] * k)
    for _ in range(8):  # the sweep visits every block within a few steps
        used = m.weight.detach().double()
    op = dense_matrix(lambda x: m._conv_forward(x, used, None), (4, 6, 6))
    assert torch.linalg.matrix_norm(op, 2) <= 1 + 1e-3

    for seed in range(3):
        torch.manual_seed(seed)
        lin = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.diag(torch.tensor([2.0, 1.5, 0.1, 0.1])))
        net = lipfx.convert(nn.Sequential(lin), torch.randn(1, 4), K=1.0).train()
        m = net.get_submodule("0")
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        x = torch.zeros(8, 4)
        x[:, 2] = torch.randn(8)
        norms = []
        for _ in range(40):
            opt.zero_grad()
            used = m.weight
            norms.append(float(torch.linalg.matrix_norm(used.detach().double(), 2)))
            (-(nn.functional.linear(x, used)[:, 2] * x[:, 2]).mean()).backward()
            opt.step()
        assert max(norms[20:]) <= 1 + 1e-3, (seed, norms)  # the lag of the first large steps is over


def test_a_conv_called_at_another_input_size_warns(tmp_path):
    """A spatial conv's bound is taken at the input size of convert's example; at another size
    its norm can exceed K (here 1.15 K: the kernel [1, 0, -1] bounded on a 4-point grid, used on
    32 points, against the dense SVD). Found by an attack: it went unnoticed. Now a warning names
    the layer and both sizes, once per size, also after deepcopy and save/load; none at the
    example's size, and a baked model (plain torch) carries no hook."""
    import warnings

    from reference import dense_matrix

    conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, 0.0, -1.0]]]))
    net = lipfx.convert(nn.Sequential(conv), torch.randn(1, 1, 4), K=1.0).train()
    m = net.get_submodule("0")
    used = m.weight.detach().double()
    big = float(torch.linalg.matrix_norm(dense_matrix(lambda x: m._conv_forward(x, used, None), (1, 32)), 2))
    assert big > 1.1  # what the warning is about
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        net(torch.randn(2, 1, 4))
        net(torch.randn(1, 4))  # unbatched
        assert not seen
        net(torch.randn(2, 1, 32))
        net(torch.randn(2, 1, 32))
        assert len(seen) == 1 and "'0'" in str(seen[0].message) and "size 4 " in str(seen[0].message) \
            and "at 32:" in str(seen[0].message), [str(w.message) for w in seen]
        copy.deepcopy(net)(torch.randn(2, 1, 16))
        lipfx.save(net, tmp_path / "net.pt")
        lipfx.load(tmp_path / "net.pt")(torch.randn(2, 1, 8))
        assert len(seen) == 3, [str(w.message) for w in seen]
    baked = lipfx.bake(net)
    assert not any(mod._forward_pre_hooks for mod in baked.modules())


def test_tiny_and_zero_weights_stay_within_K_with_finite_gradients():
    """Float32 layers whose entries are near 1e-20 (the squares power steps and norms sum
    underflow) or exactly 0: the training-mode weight's true norm stays <= K (dense SVD in
    float64), and the gradient is finite (the bound is at least bound_floor)."""
    from lipfx.normalization.rescale import bound_floor

    for scale in (1e-3, 1e-11, 1e-14, 1e-20, 1e-25, 0.0):
        for layer, shape in ((nn.Linear(40, 30), (40,)), (nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 6, 6))):
            torch.manual_seed(0)
            net = lipfx.convert(nn.Sequential(layer), torch.randn(1, *shape), K=1.0, separable=None).train()
            [(_, host, p)] = list(normalized_layers(net))
            w = host.parametrizations.weight.original
            with torch.no_grad():
                w.mul_(scale)
            for _ in range(3):
                used = host.weight
                g = torch.randn_like(used)
                (grad,) = torch.autograd.grad((used * g).sum(), w)
                assert torch.isfinite(grad).all(), (scale, layer)
                assert grad.abs().max() <= 4 * g.abs().max() * math.sqrt(g.numel()) / bound_floor(torch.float32), (scale, layer)
            true = float(true_norm(host, p, shape))
            assert true <= 1.0 * (1 + float(p.residual)) * (1 + 1e-5), (scale, layer, true)
            if scale >= 1e-11 and isinstance(layer, nn.Linear):  # above the floor: the bound stays tight
                assert true >= 0.99, (scale, layer, true)


def test_depthwise_gradient_in_closed_form_at_several_sizes():
    """A depthwise conv used at two input sizes: the training bound is the larger of the two
    spectra's peaks (the float64 circulant bound at each size; not below it with reflect
    padding, bounded through ||P||) and its hand-written
    gradient (c^2 C(f*) k / value in the winning size's block) matches central differences of
    the training forward, in float64."""
    from lipfx.norms.conv import conv_bound
    from lipfx.norms.geometry import conv_geometry

    torch.manual_seed(0)
    for conv, sizes in ((nn.Conv2d(5, 5, 3, padding=1, groups=5), [(7, 7), (12, 9)]),
                        (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, padding_mode="reflect"), [(9, 9), (6, 6)])):
        conv = conv.double()
        p = ConvNormalization(conv, sizes, K=1.4).double().train()
        assert not p.differentiable_bound  # both sizes from the cosine table: the closed form
        w = conv.weight.detach().clone().requires_grad_(True)
        exact = max(conv_bound(conv_geometry(conv, ""), n, "") for n in sizes)
        value = float(p.train_bound(w.detach(), gradient=False).value)
        if conv.padding_mode == "zeros":
            assert value == pytest.approx(exact, rel=1e-7)
        else:  # ||P|| times the valid conv's spectrum: never below the certificate's bound
            assert value >= exact * (1 - 1e-7)
        g, direction = torch.randn_like(w), torch.randn_like(w)
        (grad,) = torch.autograd.grad((p(w) * g).sum(), w)
        h = 1e-6
        with torch.no_grad():
            numeric = (float((p(w + h * direction) * g).sum()) - float((p(w - h * direction) * g).sum())) / (2 * h)
        assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-6, abs=1e-9), sizes


def same(a, b) -> bool:
    """Bitwise equality of state_dict values (tensors, or the nested extra state)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
