"""Issue 17: a training step never reads a tensor value on the host, compiles into one graph, and
keeps its guarantees under autocast.

Host reads are counted by patching ``torch.Tensor``'s value-reading methods (lipfx.host_syncs), so
the CPU finds every place a GPU step would wait; with CUDA present the same steps also run under
``torch.cuda.set_sync_debug_mode("error")``.
"""

import copy
import functools

import pytest
import torch
from torch import nn

import lipfx
from lipfx.host_syncs import count_host_syncs
from lipfx.invertible import InvertibleResidual, InvertibleSequential, Squeeze
from lipfx.normalization import ConvNormalization, DiagonalNormalization, MatrixNormalization, normalized_layers

import zoo
from test_normalization import layer_inputs, true_norm


def _net3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                         nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm3d(8),  # -> ChannelAffine
                         nn.AdaptiveAvgPool3d(1),
                         nn.Flatten(), nn.Linear(8, 3)).eval()


def _flow() -> nn.Module:
    """Four i-ResNet blocks with convs kept whole (dense blocks) after a squeeze."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4)

    def branch():
        return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ELU(), nn.Conv2d(16, 8, 3, padding=1))

    return InvertibleSequential(Squeeze(2), *[InvertibleResidual(branch(), 0.9, x) for _ in range(4)])


_MODELS = {  # label: (build, input shape); every layer kind, hard and soft, batched or not
    "mobilenet_v2": (lambda: lipfx.convert(zoo.shared("mobilenet_v2", num_classes=10), torch.zeros(1, 3, 64, 64)),
                     (2, 3, 64, 64)),
    "mobilenet_v2 soft unbatched": (lambda: lipfx.convert(zoo.shared("mobilenet_v2", num_classes=10), torch.zeros(1, 3, 64, 64),
                                                          scaling="soft", batched=False), (2, 3, 64, 64)),
    "resnet18 separable": (lambda: lipfx.convert(zoo.shared("resnet18", num_classes=10), torch.zeros(1, 3, 32, 32)), (2, 3, 32, 32)),
    "3-d net": (lambda: lipfx.convert(_net3d(), torch.zeros(1, 1, 8, 8, 8), separable=None), (2, 1, 8, 8, 8)),
    "3-d net separable soft": (lambda: lipfx.convert(_net3d(), torch.zeros(1, 1, 8, 8, 8), bn=None, scaling="soft"), (2, 1, 8, 8, 8)),
    "4-block flow": (_flow, (2, 2, 8, 8)),
}
LABELS = list(_MODELS)


@functools.lru_cache(maxsize=None)
def _built(label: str) -> nn.Module:
    torch.manual_seed(0)
    return _MODELS[label][0]().eval()


def model(label: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A private training-mode copy of model ``label`` and its input shape."""
    return copy.deepcopy(_built(label)).train(), _MODELS[label][1]


def _step(net: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    if isinstance(net, InvertibleSequential):
        y, logdet = net.forward_and_logdet(x, n_terms=3)
        loss = 0.5 * y.square().flatten(1).sum(1).mean() - logdet.mean()
    else:
        loss = net(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("label", LABELS)
def test_a_training_step_reads_nothing_on_the_host(label):
    """Forward, backward and the optimizer step of every layer kind: 0 reads of tensor values
    (the eval-mode certificate may read; training must not)."""
    net, shape = model(label)
    kinds = {type(p) for _, _, p in normalized_layers(net)}
    assert kinds & {ConvNormalization, MatrixNormalization}, label
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(shape)
    _step(net, x, opt)  # the first step may build constants; every later one must not read
    with count_host_syncs() as syncs:
        for _ in range(2):
            _step(net, x, opt)
    assert syncs.total == 0, (label, syncs)
    if torch.cuda.is_available():
        net, x = net.cuda(), x.cuda()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        _step(net, x, opt)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _step(net, x, opt)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_the_counter_sees_every_kind_of_read():
    """The check above can fail: each value-reading entry point is counted."""
    t, v = torch.ones(()), torch.arange(3.0)
    with count_host_syncs() as syncs:
        float(t), int(t), bool(t), t.item(), t.tolist(), [0, 1][t.long()], t.cpu()
        v[t.long()], v[v > 0], torch.equal(v, v), v.nonzero()  # reads inside C++ count too
        torch.tensor([1, 2], device=v.device)  # host data in: a blocking copy onto an accelerator
    assert syncs.total == 12, syncs
    assert "test_host_syncs.py" in repr(syncs)  # and says where they were written


def test_kinds_covered():
    kinds = set()
    for label in LABELS:
        net, _ = model(label)
        kinds |= {(type(p), getattr(p, "dense", None), p.s is not None) for _, _, p in normalized_layers(net)}
    assert {(ConvNormalization, True, False), (ConvNormalization, False, False), (ConvNormalization, False, True),
            (MatrixNormalization, None, False), (MatrixNormalization, None, True), (DiagonalNormalization, None, False)} <= kinds


@pytest.mark.parametrize("label", LABELS)
def test_training_forward_has_no_graph_breaks(label):
    """torch.compile(fullgraph=True) can capture a training forward (and the loss) whole. For
    the flow this is its forward map: the logdet estimators call torch.autograd.grad, which dynamo
    does not trace (a limit of the estimator, not of the normalization)."""
    net, shape = model(label)
    x = torch.randn(shape)
    fn = lambda n, x: n(x).square().mean()  # noqa: E731
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(net, x)
    assert explained.graph_break_count == 0, (label, [str(b.reason)[:300] for b in explained.break_reasons])
    assert explained.graph_count == 1, label


@pytest.mark.parametrize("separable, scaling", [("exact", "hard"), (None, "soft")])
def test_compiled_training_step_matches_eager(separable, scaling):
    """fullgraph compile (AOTAutograd, which also compiles the backward and the buffer updates):
    the same outputs, gradients and power-iteration state as eager over three steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    eager = lipfx.convert(model, x[:1], K=1.0, separable=separable, scaling=scaling).train()
    net = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        outs = [m(x) for m in (compiled, eager)]
        for out in outs:
            out.square().mean().backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        for p, q in zip(net.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)
            p.grad = q.grad = None
    for a, b in zip(net.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_bounds_in_float32(dtype):
    """Under autocast the bounds are computed in float32: the normalized weights equal the
    un-autocast ones, every layer's training-mode norm is <= K (1 + 1e-3), and the step trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    K = 1.5
    net = lipfx.convert(model, x[:1], K=K, bn=None).train()  # BatchNorm kept in training: not normalized
    plain = {n: m.weight.detach().clone() for n, m, p in normalized_layers(net)}
    with torch.autocast("cpu", dtype=dtype):
        auto = {n: m.weight for n, m, p in normalized_layers(net)}
        for n, w in auto.items():
            assert w.dtype == torch.float32, n
            # (each read advances the power iteration, so not bitwise; a bf16 bound would be 1e-2 off)
            torch.testing.assert_close(w.detach(), plain[n], rtol=1e-5, atol=0)
        out = net(x)
    assert out.dtype == dtype
    shapes = layer_inputs(net, x[:1])
    net.train()
    norms = {n: true_norm(m, p, shapes[n]) for n, m, p in normalized_layers(net)}
    assert max(norms.values()) <= K * (1 + 1e-3), norms
    assert max(norms.values()) >= K * 0.99, norms


def test_grad_scaler_steps_like_the_unscaled_step():
    """fp16 autocast with a GradScaler: the unscaled gradients equal plain autocast's, and the
    step changes the weights (no inf/nan skip)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    net = lipfx.convert(model, x[:1], K=1.0).train()
    twin = copy.deepcopy(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(net(x), y)
        reference = nn.functional.cross_entropy(twin(x), y)
    scaler.scale(loss).backward()
    reference.backward()
    scaler.unscale_(opt)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=1e-4)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # no overflow was found
    assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
