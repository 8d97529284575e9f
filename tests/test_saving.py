"""lipfx.save / lipfx.load: a normalized model round-trips whole and trains on identically."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import lipfx
from lipfx.normalization import normalized_layers

from test_convert import randomize_batchnorm


def small_net() -> nn.Module:
    # a BatchNorm that folds, one that cannot (-> ChannelAffine), a 3x3 conv (-> separable pair)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))
    randomize_batchnorm(model)
    return model.eval()


def _step(net: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    net(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def trained():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    net = lipfx.convert(small_net(), x[:1], K={"4*": 0.8, "*": 1.3}, scaling="soft")
    for _ in range(3):
        _step(net, x)
    return net, x


def test_round_trip_restores_everything_and_trains_on_identically(trained, tmp_path):
    net, x = trained
    path = tmp_path / "net.pt"
    lipfx.save(net, path)
    loaded = lipfx.load(path)
    assert loaded is not net
    assert [(n, type(p).__name__, p.constant()) for n, _, p in normalized_layers(loaded)] == [
        (n, type(p).__name__, p.constant()) for n, _, p in normalized_layers(net)]
    assert len(list(normalized_layers(loaded))) == 6  # ChannelAffine, two separable pairs, the linear
    assert str(loaded.lipfx_report) == str(net.lipfx_report)
    a, b = net.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(net.eval()(x), loaded.eval()(x))
    # training goes on bit for bit: power-iteration vectors and drift references came back
    _step(net, x), _step(loaded, x)
    for (name, p), q in zip(net.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    with torch.no_grad():
        assert torch.equal(net.eval()(x), loaded.eval()(x))
    assert lipfx.certificate(loaded, x[:1]).bound == pytest.approx(lipfx.certificate(net, x[:1]).bound, rel=1e-12)


def test_saving_leaves_the_model_alone(trained, tmp_path):
    net, x = trained
    before = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        y = net.eval()(x)
    lipfx.save(net, tmp_path / "net.pt")
    assert len(list(normalized_layers(net))) == 6
    with torch.no_grad():
        assert torch.equal(net(x), y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if isinstance(v, torch.Tensor))


def test_plain_and_baked_models_load_without_lipfx(trained, tmp_path):
    net, x = trained
    baked = lipfx.bake(net)
    lipfx.save(baked, tmp_path / "baked.pt")
    with torch.no_grad():
        torch.save(baked(x), tmp_path / "y.pt")
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys; sys.modules['lipfx'] = None\n"  # importing lipfx now fails
        "import torch\n"
        "m = torch.load('baked.pt', weights_only=False)\n"
        "assert torch.equal(m(torch.load('x.pt')), torch.load('y.pt'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    plain = small_net()
    lipfx.save(plain, tmp_path / "plain.pt")
    again = torch.load(tmp_path / "plain.pt", weights_only=False)
    assert type(again) is nn.Sequential and torch.equal(again(x), plain(x))


def test_a_state_dict_file_is_not_a_model(tmp_path):
    torch.save(small_net().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(lipfx.LipfxError, match="state_dict"):
        lipfx.load(tmp_path / "sd.pt")
    with pytest.raises(FileNotFoundError):
        lipfx.load(tmp_path / "missing.pt")


def test_a_file_that_is_no_model_names_the_file(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a torch file")
    with pytest.raises(lipfx.LipfxError, match=r"cannot read model file .*notes\.pt.*UnpicklingError"):
        lipfx.load(bad)
