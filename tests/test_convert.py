"""lipfx.convert: equivalence on the torchvision zoo and on every conv configuration."""

import copy
import functools
import io

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import lipfx
from lipfx.layers import ChannelAffine, SeparableConv
from lipfx.norms.geometry import conv_geometry
from zoo import randomize_batchnorm  # tests/zoo.py; other test files import it from here

# (name, input size, extra constructor kwargs); small inputs where the model allows
ZOO = [
    ("resnet18", 64, {}), ("resnet50", 64, {}), ("resnext50_32x4d", 64, {}), ("wide_resnet50_2", 64, {}),
    ("mobilenet_v2", 64, {}), ("mobilenet_v3_small", 64, {}), ("efficientnet_b0", 64, {}),
    ("mnasnet0_5", 64, {}), ("shufflenet_v2_x1_0", 64, {}), ("squeezenet1_0", 64, {}), ("vgg11", 32, {}),
    ("alexnet", 64, {}), ("densenet121", 64, {}), ("googlenet", 64, {"aux_logits": False, "init_weights": True}),
    ("inception_v3", 75, {"aux_logits": False, "init_weights": True}), ("regnet_x_400mf", 64, {}),
    ("convnext_tiny", 64, {}), ("vit_b_16", 32, {"image_size": 32}), ("swin_t", 64, {}),
]
# These tests check the rewrite itself (outputs reproduced), so normalization is off here;
# tests/test_normalization.py covers it.
convert = functools.partial(lipfx.convert, normalize=False)

SLOW = {"resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "vit_b_16", "inception_v3", "convnext_tiny"}




def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "name,size,kwargs", [pytest.param(*z, marks=pytest.mark.slow if z[0] in SLOW else ()) for z in ZOO]
)
def test_zoo_conversion_reproduces_outputs(name, size, kwargs, zoo):
    model = zoo(name, **kwargs)  # random BatchNorm statistics, no all-zero head (ViT's: outputs 0)
    x = torch.randn(2, 3, size, size)
    net = convert(model, x).eval()
    with torch.no_grad():
        assert rel_error(net(x), model(x)) <= 1e-4
    # every remaining conv is depthwise or pointwise; no BatchNorm is left
    for m in net.modules():
        assert not isinstance(m, _BatchNorm)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            g = conv_geometry(m)
            assert g.is_depthwise or g.is_pointwise, m
    model64, x64 = model.double(), x.double()
    net64 = convert(model64, x64).eval()
    with torch.no_grad():
        assert rel_error(net64(x64), model64(x64)) <= 1e-9


def _conv_net(conv: nn.Module, d: int) -> nn.Module:
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d](conv.out_channels)
    return nn.Sequential(conv, bn, nn.ReLU())


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (3, 1, 3)])
def test_conv_configurations_convert_exactly(d, mode, stride, dilation, groups):
    conv = CONV[d](6, 12, 3, stride=stride, dilation=dilation, groups=groups, padding=2, padding_mode=mode)
    model = _conv_net(conv, d).double().eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 6, *([9] * d), dtype=torch.float64)
    net = convert(model, x).eval()
    assert isinstance(net.get_submodule("0"), SeparableConv)
    assert net.get_submodule("0.depthwise").padding_mode == mode
    with torch.no_grad():
        assert rel_error(net(x), model(x)) <= 1e-9


def test_same_padding_even_kernel():
    model = nn.Sequential(nn.Conv2d(3, 5, 4, padding="same", dilation=2)).double().eval()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        assert rel_error(convert(model, x)(x), model(x)) <= 1e-9


def test_depthwise_and_pointwise_convs_are_kept():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 5, 1)).eval()
    net = convert(model, torch.randn(1, 4, 8, 8))
    assert not any(isinstance(m, SeparableConv) for m in net.modules())
    assert not [r for r in net.lipfx_report.records if r.action.startswith("separable")]


def test_names_stay_findable(zoo):
    net = zoo.converted("resnet18", (1, 3, 32, 32))
    names = dict(net.named_modules())
    assert "layer1.0.conv1.depthwise" in names and "layer1.0.conv1.pointwise" in names
    targets = {n.target for n in net.graph.nodes if n.op == "call_module"}
    assert {"layer1.0.conv1.depthwise", "layer1.0.conv1.pointwise"} <= targets


def test_input_model_is_not_modified(zoo):
    model = zoo("resnet18")
    before = copy.deepcopy(model.state_dict())
    convert(model, torch.randn(1, 3, 32, 32))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_bn_without_a_foldable_neighbour_becomes_channel_affine():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).double().eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    net = convert(model, x)
    assert isinstance(net.get_submodule("2"), ChannelAffine)
    bn = model[2]
    expected = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max()
    assert torch.allclose(net.get_submodule("2").scale.abs().max(), expected)
    with torch.no_grad():
        assert rel_error(net.eval()(x), model(x)) <= 1e-9


def test_linear_then_batchnorm1d_is_folded():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)).double().eval()
    randomize_batchnorm(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    net = convert(model, x)
    assert net.lipfx_report.by_action("bn-folded")
    with torch.no_grad():
        assert rel_error(net.eval()(x), model(x)) <= 1e-9


def test_bn_remove_drops_every_batchnorm(zoo):
    model = zoo.shared("resnet18")
    net = convert(model, torch.randn(1, 3, 32, 32), bn="remove")
    assert not any(isinstance(m, _BatchNorm) for m in net.modules())
    assert len(net.lipfx_report.by_action("bn-removed")) == 20


def test_batchnorm_without_running_stats_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(lipfx.LipfxError, match="node '.*' \\(module '2'\\).*bn='remove'"):
        convert(model, torch.randn(1, 3, 8, 8))


def test_lowrank_error_falls_with_rank_and_vanishes_at_full_rank():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).double().eval()
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    kernel_errors, output_errors = [], []
    for rank in range(1, 10):
        net = convert(model, x, separable="lowrank", rank=rank)
        (record,) = net.lipfx_report.by_action("separable-lowrank")
        kernel_errors.append(record.relative_error)
        with torch.no_grad():
            output_errors.append(rel_error(net(x), y))
    assert all(b < a for a, b in zip(kernel_errors, kernel_errors[1:]))
    assert kernel_errors[-1] < 1e-12 and output_errors[-1] < 1e-9
    assert output_errors[0] > 1e-2  # rank 1 really approximates


def test_fresh_mode_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # a learnable made-up task
    net = convert(model, x, separable="fresh").train()
    assert isinstance(net.get_submodule("0"), SeparableConv) and net.get_submodule("0").rank == 1
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return x
        return -x


def test_untraceable_model_names_the_module_and_hints_leaf_modules():
    with pytest.raises(lipfx.TraceError, match="module 'gate' \\(Gate\\).*leaf_modules=\\['gate'\\]"):
        convert(Branchy(), torch.randn(1, 3, 6, 6))
    net = convert(Branchy(), torch.randn(1, 3, 6, 6), leaf_modules=["gate"])
    assert isinstance(net.gate, Gate)


class TestOrdinaryModule:
    @pytest.fixture
    def pair(self, zoo):
        # one conversion per session, a copy per test (the tests switch modes and cast)
        return zoo.converted("resnet18", (2, 3, 32, 32), num_classes=10), torch.randn(2, 3, 32, 32)

    def test_state_dict_round_trip_into_a_fresh_conversion(self, pair):
        net, x = pair
        other = convert(torchvision.models.resnet18(num_classes=10).eval(), x).eval()
        other.load_state_dict(net.state_dict())
        with torch.no_grad():
            assert torch.equal(other(x), net(x))

    def test_deepcopy_save_load(self, pair):
        net, x = pair
        buf = io.BytesIO()
        torch.save(net, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        with torch.no_grad():
            assert torch.equal(copy.deepcopy(net)(x), net(x))
            assert torch.equal(loaded(x), net(x))

    def test_dtype_and_modes(self, pair):
        net, x = pair
        net64 = copy.deepcopy(net).to(torch.float64)
        with torch.no_grad():
            assert rel_error(net64(x.double()), net(x).double()) < 1e-4
        net.train()
        assert all(m.training for m in net.modules())
        net.eval()
        assert not any(m.training for m in net.modules())

    def test_report_is_readable(self, pair):
        net, _ = pair
        text = str(net.lipfx_report)
        assert "layer1.0.conv1" in text and "separable-exact" in text and "bn-folded" in text


def test_bad_arguments_get_one_lipfx_error_naming_the_problem():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(lipfx.ShapeError, match=r"shape \(1, 3, 10, 10\): module '3' \(Linear\) failed"):
        convert(model, torch.randn(1, 3, 10, 10))
    with pytest.raises(lipfx.ShapeError, match=r"\(Conv2d\) failed.*3 channels"):
        convert(model, torch.randn(1, 2, 8, 8))
    with pytest.raises(lipfx.ArgumentError, match=r"state_dict \(4 tensors.*load_state_dict"):
        convert(model.state_dict(), torch.randn(1, 3, 8, 8))
    with pytest.raises(lipfx.ArgumentError, match=r"string 'torchvision:resnet19'; pass an nn.Module.*load_model"):
        convert("torchvision:resnet19", torch.randn(1, 3, 8, 8))
    with pytest.raises(lipfx.ArgumentError, match="example_inputs must be a tensor"):
        convert(model, [1, 3, 8, 8])
    with pytest.raises(ValueError, match="unknown bn mode"):  # an ArgumentError is still a ValueError
        convert(model, torch.randn(1, 3, 8, 8), bn="drop")


def test_model_names_resolve_and_unknown_ones_list_close_matches():
    from lipfx.models import load_model

    assert isinstance(load_model("torchvision:resnet18"), nn.Module)
    with pytest.raises(lipfx.ArgumentError, match="unknown torchvision model 'resnet19'; did you mean .*resnet18"):
        load_model("torchvision:resnet19")
