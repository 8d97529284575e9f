"""Differential fuzzing of whole graphs, seeded (hypothesis, derandomized):

- random DAGs of convs, BatchNorms (shared, called twice), activations, sums, products with
  constants, maxima, pooling, indexing, detach and in-place ops: certified against secant
  quotients computed without autograd, and ``convert(normalize=False)`` must reproduce their
  outputs and keep the certificate sound;
- random chains of every registered op's own fuzz cases (lipfx.ops.fuzzing.random_chain), joined
  by random linear maps, so every rule is checked inside a graph too."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lipfx
from lipfx.ops import fuzzing
from lipfx.ops.fuzzing import secant_lower_bound

C, N = 3, 5  # channels and spatial size of every value in the graph
UNARY = ["conv3", "conv1", "depthwise", "bn", "bn_shared", "conv_shared", "relu", "relu_", "leaky", "elu",
         "tanh", "gelu", "scale", "avgpool", "maxpool", "index", "permute", "detach"]
BINARY = ["add", "sub", "maximum", "cat_conv"]


class RandomNet(nn.Module):
    """A DAG: step i applies an op to one or two earlier values (index 0 is the input)."""

    def __init__(self, steps: list[tuple[str, int, int]], seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.steps = steps
        self.layers = nn.ModuleDict()
        self.shared_conv = nn.Conv2d(C, C, 3, padding=1)
        self.shared_bn = nn.BatchNorm2d(C)
        for i, (op, _, _) in enumerate(steps):
            layer = {"conv3": lambda: nn.Conv2d(C, C, 3, padding=1), "conv1": lambda: nn.Conv2d(C, C, 1),
                     "depthwise": lambda: nn.Conv2d(C, C, 3, padding=1, groups=C), "bn": lambda: nn.BatchNorm2d(C),
                     "leaky": lambda: nn.LeakyReLU(0.3), "elu": lambda: nn.ELU(1.5), "gelu": lambda: nn.GELU(),
                     "cat_conv": lambda: nn.Conv2d(2 * C, C, 1), "maxpool": lambda: nn.MaxPool2d(3, 1, 1),
                     "avgpool": lambda: nn.AvgPool2d(3, 1, 1)}.get(op)
            if layer is not None:
                self.layers[str(i)] = layer()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(C, generator=g))
                m.running_var.copy_(torch.rand(C, generator=g) + 0.3)
                m.weight.data.copy_(torch.randn(C, generator=g))
        self.register_buffer("gain", torch.randn(1, C, 1, 1, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for i, (op, a, b) in enumerate(self.steps):
            u, v = values[a % len(values)], values[b % len(values)]
            layer = self.layers[str(i)] if str(i) in self.layers else None
            if op in ("conv3", "conv1", "depthwise", "bn", "leaky", "elu", "gelu", "maxpool", "avgpool"):
                out = layer(u)
            elif op == "bn_shared":
                out = self.shared_bn(u)
            elif op == "conv_shared":
                out = self.shared_conv(u)
            elif op == "relu":
                out = torch.relu(u)
            elif op == "relu_":
                out = (u * 1.0).relu_()  # in place on a fresh tensor: nobody else reads it
            elif op == "tanh":
                out = torch.tanh(u)
            elif op == "scale":
                out = u * self.gain
            elif op == "index":
                out = u[:, [2, 0, -1]]  # a negative index repeating channel 2
            elif op == "permute":
                out = u.permute(0, 1, 3, 2).transpose(2, 3)
            elif op == "detach":
                out = u + (2 * u).detach()  # values: 3u
            elif op == "add":
                out = u + v
            elif op == "sub":
                out = u - 2 * v
            elif op == "maximum":
                out = torch.maximum(u, v)
            else:  # cat_conv
                out = layer(torch.cat([u, v], 1))
            values.append(out)
        return values[-1]


step = st.one_of(
    st.tuples(st.sampled_from(UNARY), st.integers(0, 20), st.just(0)),
    st.tuples(st.sampled_from(BINARY), st.integers(0, 20), st.integers(0, 20)),
)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=2, max_size=7), seed=st.integers(0, 2**16))
def test_random_graphs_certificate_and_conversion(steps, seed):
    net = RandomNet(steps, seed).double().eval()
    x = torch.randn(1, C, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    lower = secant_lower_bound(net, (x,), g, pairs=12)
    cert = lipfx.certificate(net, x)
    assert lower <= cert.bound * (1 + 1e-6) + 1e-12, (steps, lower, cert.bound)
    converted = lipfx.convert(net, x, normalize=False)
    torch.testing.assert_close(converted(x), net(x), rtol=1e-9, atol=1e-9)
    bound = lipfx.certificate(converted, x).bound
    assert lower <= bound * (1 + 1e-6) + 1e-12, (steps, lower, bound)
    assert math.isfinite(bound) == math.isfinite(cert.bound)


def test_the_graph_fuzzer_reaches_every_op():
    # every op of the vocabulary appears in the certificate of a net made of it alone
    for op in UNARY + BINARY:
        net = RandomNet([(op, 0, 0)], 0).double().eval()
        cert = lipfx.certificate(net, torch.randn(1, C, N, N, dtype=torch.float64))
        assert len(cert.records) > 2 and math.isfinite(cert.bound), op


# --- chains of every entry's own fuzz cases, joined by random linear maps -------------------------
ENTRIES = [e for e in lipfx.ops.entries() if e.fuzz is not None]


def _check_chain(chain, x, g) -> None:
    cert = lipfx.certificate(chain, x)
    lower = secant_lower_bound(chain, (x,), g, pairs=8)
    assert lower <= cert.bound * (1 + 1e-6) + 1e-12, ([type(o).__name__ for o in chain.ops], lower, cert.bound)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), length=st.integers(2, 4))
def test_random_chains_of_registered_ops_are_certified_soundly(seed, length):
    g = torch.Generator().manual_seed(seed)
    drawn = fuzzing.random_chain(ENTRIES, g, length)
    if drawn is not None:  # an unbounded op was drawn: nothing finite to compare
        _check_chain(*drawn, g)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.keys[0] if isinstance(e.keys[0], str)
                         else getattr(e.keys[0], "__name__", repr(e.keys[0])))
def test_every_registered_op_in_a_chain(entry):
    # each rule inside a graph (two of its cases joined by a random map), not only on its own
    g = torch.Generator().manual_seed(1)
    drawn = fuzzing.random_chain([entry], g, 2)
    if drawn is None:
        pytest.skip("no case to chain (an unbounded op: no finite claim)")
    _check_chain(*drawn, g)
