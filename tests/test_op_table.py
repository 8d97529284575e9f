"""The op table: every entry complete and sound on its own fuzz cases; user entries that work."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipfx
from lipfx import ops
from lipfx.ops import fuzzing

ENTRIES = ops.entries()


def _entry_id(entry: ops.OpEntry) -> str:
    key = entry.keys[0]
    return key if isinstance(key, str) else getattr(key, "__name__", repr(key))


@pytest.mark.parametrize("entry", ENTRIES, ids=_entry_id)
def test_every_entry_has_the_pieces_it_needs(entry):
    assert entry.missing() == [], f"{entry.keys}: missing {entry.missing()}"


def test_completeness_check_names_a_missing_piece():
    conv = ops.lookup(nn.Conv2d)
    from dataclasses import replace

    assert replace(conv, normalization=None).missing() == ["normalization"]
    assert replace(conv, fuzz=None).missing() == ["fuzz"]


def test_one_key_space_and_no_key_in_two_entries():
    keys = [k for e in ENTRIES for k in set(e.keys)]  # (torch.relu_ is F.relu_: one key, two names)
    assert len(keys) == len(set(keys)), "a key is declared by two entries"
    assert all(ops.lookup(k) is e for e in ENTRIES for k in e.keys)
    kinds = {type(k).__name__ for k in keys}
    assert {"str", "type"} <= kinds  # method names and module types side by side with functions


@pytest.mark.parametrize("entry", ENTRIES, ids=_entry_id)
def test_certificate_is_never_below_a_secant_quotient(entry):
    # each of the entry's keys on its own legal calls, certified as a one-op network, against
    # ||f(x) - f(y)|| / ||x - y|| computed in float64 without autograd
    results = fuzzing.check_entry(entry)
    for key, bound, lower in results:
        assert lower > 0 or bound == 0 or not math.isfinite(bound), (key, bound, lower)


def test_the_fuzz_check_catches_a_rule_below_the_true_constant():
    # flatten has norm 1 exactly: a rule claiming 0.98 must be caught on its own fuzz cases
    entry = ops.lookup(torch.flatten)
    from dataclasses import replace

    shrunk = replace(entry, rule=lambda ctx: ops.Step.affine(0.98, "too small"))
    with pytest.raises(AssertionError, match="certificate"):
        fuzzing.check_entry(shrunk)


@pytest.mark.parametrize("entry", ENTRIES, ids=_entry_id)
def test_the_fuzz_check_catches_every_rule_shrunk_by_2_percent(entry):
    from dataclasses import replace

    def shrunk(ctx, rule=entry.rule):
        step = rule(ctx)
        return replace(step, factors=tuple(0.98 * f for f in step.factors))

    if not fuzzing.check_entry(entry):
        pytest.skip("an unbounded op: no finite claim to shrink")
    with pytest.raises(AssertionError, match="certificate"):
        fuzzing.check_entry(replace(entry, rule=shrunk))


class Swish2(nn.Module):
    """A user's activation: x * sigmoid(x), traced by fx into primitive ops unless it is a leaf."""

    def forward(self, x):
        return x * torch.sigmoid(x)


def test_a_users_module_rule_is_used_and_scoped():
    net = nn.Sequential(nn.Linear(4, 4), Swish2())
    x = torch.randn(2, 4)
    assert math.isinf(lipfx.certificate(net, x).bound)  # inlined: a product of two inputs
    with ops.scoped():
        ops.register(Swish2, rule=ops.constant(1.09984, "SiLU' <= 1.0998"),
                     fuzz=fuzzing.unary(scale=3.0))
        assert ops.is_leaf(Swish2())
        cert = lipfx.certificate(net, x)
        assert cert.records[-2].op == "Swish2"
        assert cert.bound == pytest.approx(1.09984 * lipfx.layer_bound(net[0], (4,)), rel=1e-9)
        fuzzing.check_entry(ops.lookup(Swish2))
    assert ops.lookup(Swish2) is None  # gone with the block
    assert math.isinf(lipfx.certificate(net, x).bound)


def test_unregister_removes_a_key():
    with ops.scoped():
        ops.register(Swish2, rule=ops.constant(2.0, "two"), fuzz=fuzzing.unary())
        ops.unregister(Swish2)
        assert ops.lookup(Swish2) is None


def test_decorator_forms_register_into_the_same_table():
    with ops.scoped():
        @lipfx.certify.register_function_rule(torch.special.erf)
        def _erf(ctx):
            return ops.Step.scale(2 / math.sqrt(math.pi), "erf' <= 2/sqrt(pi)")

        assert ops.lookup(torch.special.erf).rule is _erf
    assert ops.lookup(torch.special.erf) is None


class ScaledTanh(nn.Module):
    """The README's extension example: an activation with a weight that lipfx normalizes."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((n,), 2.0))

    def forward(self, x):
        return torch.tanh(x) * self.weight


def test_readme_extension_example_one_entry_with_rule_fuzz_and_normalization():
    from lipfx.normalization import DiagonalNormalization

    with ops.scoped():
        ops.register(
            ScaledTanh,
            rule=lambda ctx: ops.Step.scale(float(ctx.module.weight.detach().abs().max()), "max|w| tanh'"),
            fuzz=lambda key, g: [ops.FuzzCase(ScaledTanh(3), (fuzzing.randn((2, 3), g, 3.0),))],
            layer_bound=lambda m, shape, method, label: float(m.weight.detach().abs().max()),
            linear_map=lambda m, name, shape: None,  # not linear: nothing to compose
            normalization=lambda m, shapes, k, options, name: DiagonalNormalization(k, options.scaling, name=name),
        )
        assert ops.lookup(ScaledTanh).missing() == []
        fuzzing.check_entry(ops.lookup(ScaledTanh))
        net = lipfx.convert(nn.Sequential(nn.Linear(3, 3), ScaledTanh(3)), torch.randn(1, 3), K=0.5)
        assert [name for name, _, _ in lipfx.normalized_layers(net)] == ["0", "1"]
        net.eval()
        assert float(net.get_submodule("1").weight.abs().max()) == pytest.approx(0.5, rel=1e-5)
        assert lipfx.certificate(net, torch.randn(1, 3)).bound <= 0.25 * (1 + 1e-5)
