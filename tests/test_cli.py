"""The console script end to end, in a subprocess."""

import re
import subprocess
import sys

import pytest

from lipfx.cli import main
from lipfx.norms import layer_bound


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lipfx.cli", *args], capture_output=True, text=True, timeout=300)


def test_bounds_matches_layer_bound():
    res = _run("bounds", "torchvision:squeezenet1_0", "--input-shape", "3,64,64")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()[1:]]
    assert rows[0][0] == "features.0" and rows[0][1] == "3x64x64"
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0()
    assert abs(float(rows[0][2]) - layer_bound(model.features[0], (3, 64, 64))) < 1e-3


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("lipfx ")


def test_certify_json_matches_the_library(tmp_path):
    out = tmp_path / "cert.json"
    res = _run("certify", "torchvision:squeezenet1_0", "--input-shape", "3,64,64", "--convert", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "Lipschitz bound" in res.stdout and "critical path" in res.stdout
    import json

    import torch
    import torchvision

    import lipfx

    data = json.loads(out.read_text())
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0().eval()
    x = torch.randn(1, 3, 64, 64)
    cert = lipfx.certificate(lipfx.convert(model, x, normalize=False), x)
    assert data["bound"] == pytest.approx(cert.bound, rel=1e-9)
    assert [n["name"] for n in data["nodes"]] == [r.name for r in cert.records]
    quiet = _run("certify", "torchvision:squeezenet1_0", "--input-shape", "3,64,64", "--quiet")
    assert quiet.returncode == 0 and len(quiet.stdout.split()) == 1 and float(quiet.stdout) > 0


def test_certify_with_K_normalizes_every_layer(tmp_path):
    out = tmp_path / "cert.json"
    res = _run("certify", "torchvision:squeezenet1_0", "--input-shape", "3,64,64", "--K", "0.5", "--json", str(out))
    assert res.returncode == 0, res.stderr
    import json

    data = json.loads(out.read_text())
    layers = [n for n in data["nodes"] if n["op"].startswith("Parametrized")]
    assert layers and all(n["local"] <= 0.5 for n in layers)  # each normalized layer's certified norm


def test_certify_names_the_culprits_of_an_infinite_bound():
    res = _run("certify", "torchvision:mobilenet_v3_small", "--input-shape", "3,32,32")
    assert res.returncode == 0, res.stderr
    assert "Lipschitz bound (l2, eval mode): inf" in res.stdout
    assert "squeeze-excitation" in res.stdout and "in module 'features." in res.stdout


def test_convert_saves_a_model_that_loads_certifies_and_matches_the_library(tmp_path):
    out = tmp_path / "sq.pt"
    res = _run("convert", "torchvision:squeezenet1_0", "--input-shape", "3,32,32", "--K", "0.5", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "35 layers normalized" in res.stdout
    assert re.search(r"^converting torchvision:squeezenet1_0 .* \.\.\. [0-9.]+ s$", res.stderr, flags=re.M)
    import torch
    import torchvision

    import lipfx
    from lipfx.normalization import normalized_layers

    loaded = lipfx.load(out).eval()
    layers = list(normalized_layers(loaded))
    assert all(p.constant() == 0.5 for _, _, p in layers)
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0().eval()
    x = torch.randn(1, 3, 32, 32)
    net = lipfx.convert(model, x, K=0.5).eval()
    assert [n for n, _, _ in layers] == [n for n, _, _ in normalized_layers(net)] and len(layers) == 35
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    bound = lipfx.certificate(net, x).bound
    printed = float(res.stdout.split("Lipschitz bound ")[1].split()[0])
    assert printed == pytest.approx(bound, rel=1e-5)
    again = _run("certify", str(out), "--input-shape", "3,32,32", "--quiet")
    assert again.returncode == 0, again.stderr
    assert float(again.stdout) == pytest.approx(bound, rel=1e-5)


def test_convert_bake_with_a_budget_and_weights(tmp_path):
    import torch
    import torchvision

    import lipfx

    torch.manual_seed(7)
    torch.save(torchvision.models.squeezenet1_0().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "baked.pt"
    res = _run("convert", "torchvision:squeezenet1_0", "--weights", str(tmp_path / "w.pt"), "--input-shape",
               "3,32,32", "--lipschitz", "1", "--bake", "-o", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # --quiet: no progress
    baked = torch.load(out, weights_only=False)
    assert not any(type(m).__module__.startswith("lipfx") for m in baked.modules())
    x = torch.randn(1, 3, 32, 32)
    assert float(res.stdout) == pytest.approx(lipfx.certificate(baked, x).bound, rel=1e-5) and float(res.stdout) <= 1.0
    # --weights really loaded: the plain model with those weights has the certificate certify prints
    model = torchvision.models.squeezenet1_0()
    model.load_state_dict(torch.load(tmp_path / "w.pt"))
    plain = _run("certify", "torchvision:squeezenet1_0", "--weights", str(tmp_path / "w.pt"), "--input-shape",
                 "3,32,32", "--quiet")
    assert float(plain.stdout) == pytest.approx(lipfx.certificate(model.eval(), x).bound, rel=1e-5)


def _bad_files(d):
    import torch
    import torchvision

    (d / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save(torchvision.models.squeezenet1_0().state_dict(), d / "sd.pt")
    torch.save({"fc.weight": torch.zeros(3, 3)}, d / "wrong.pt")
    (d / "factory_fails.py").write_text("def make():\n    raise ValueError('no GPU here')\n")
    (d / "not_a_module.py").write_text("def make():\n    return 3\n")
    (d / "untraceable.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x) if x.sum() > 0 else x  # data-dependent control flow\n"
        "def make():\n"
        "    return Net()\n")


BAD_INPUTS = [
    (["bounds", "torchvision:nosuchnet"], "unknown torchvision model"),
    (["bounds", "resnet18"], "expected 'torchvision:NAME'"),
    (["bounds", "torchvision:resnet18", "--input-shape", "3,a,4"], "bad input shape"),
    (["bounds", "torchvision:resnet18", "--input-shape", "5,32,32"], "does not run"),
    (["bounds", "nosuchpkg.mod:make"], "cannot import"),
    (["certify", "torchvision:nosuchnet"], "unknown torchvision model"),
    (["certify", "torchvision:resnet18", "--input-shape", "0,3"], "bad input shape"),
    (["certify", "torchvision:resnet18", "--input-shape", "5,32,32"], "does not run"),
    (["certify", "torchvision:squeezenet1_0", "--input-shape", "3,32,32", "--json", "no/such/dir/x.json"], "cannot write"),
    (["certify", "torchvision:resnet18", "--K", "0"], "--K must be a positive"),
    (["certify", "torchvision:resnet18", "--K", "-2"], "--K must be a positive"),
    (["certify", "missing.pt"], "no such model file"),
    (["certify", "corrupt.pt"], "cannot read model file"),
    (["certify", "sd.pt"], "holds a state_dict"),
    (["certify", "torchvision:squeezenet1_0", "--weights", "missing.pt"], "no such weights file"),
    (["certify", "torchvision:squeezenet1_0", "--weights", "corrupt.pt"], "cannot read weights file"),
    (["certify", "torchvision:squeezenet1_0", "--weights", "wrong.pt"], "do not fit the model"),
    (["certify", "factory_fails:make"], "make() failed: ValueError: no GPU here"),
    (["certify", "not_a_module:make"], "returned a int, not an nn.Module"),
    (["certify", "untraceable:make", "--input-shape", "4"], "torch.fx cannot trace"),
    (["convert", "untraceable:make", "--input-shape", "4", "-o", "x.pt"], "torch.fx cannot trace"),
    (["convert", "torchvision:resnet18", "-o", "x.pt", "--K", "0"], "--K must be a positive"),
    (["convert", "torchvision:resnet18", "-o", "x.pt", "--lipschitz", "-1"], "--lipschitz must be a positive"),
    (["convert", "torchvision:resnet18", "-o", "x.pt", "--K", "2", "--no-normalize"], "drop --no-normalize"),
    (["convert", "torchvision:vit_b_16", "--input-shape", "3,32,32", "-o", "x.pt"], "does not run"),
    (["convert", "torchvision:squeezenet1_0", "--input-shape", "3,32,32", "-o", "no/dir/x.pt"], "cannot write"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[f"{a[0]}-{m}" for a, m in BAD_INPUTS])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    """Through the console entry point in this process (a subprocess per case would cost 3 s of
    imports each); the subprocess test below checks the same at the process boundary."""
    _bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lipfx: error:")]
    assert len(errors) == 1 and message in errors[0], err
    others = [line for line in err.splitlines() if not line.startswith("lipfx: error:")]
    assert all(re.fullmatch(r"(loading|converting|certifying) .* \.\.\.( [0-9.]+ s)?", line) for line in others), err


def test_bad_input_at_the_process_boundary(tmp_path):
    _bad_files(tmp_path)
    for args in (["certify", "torchvision:nosuchnet"], ["convert", "corrupt.pt", "-o", "x.pt"]):
        res = subprocess.run([sys.executable, "-m", "lipfx.cli", *args], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
        assert res.returncode == 2
        assert "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("lipfx: error:")


def test_bounds_quiet_prints_only_the_bounds(capsys):
    assert main(["bounds", "torchvision:squeezenet1_0", "--input-shape", "3,32,32"]) == 0
    table = capsys.readouterr()
    rows = [line.split() for line in table.out.splitlines()[1:]]
    assert main(["bounds", "torchvision:squeezenet1_0", "--input-shape", "3,32,32", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "layer" not in quiet.out
    values = [float(v) for v in quiet.out.split()]  # numbers only, one per layer
    assert len(values) == len(rows) == len(quiet.out.splitlines())
    assert values == pytest.approx([float(r[2]) for r in rows], rel=1e-3)


@pytest.mark.parametrize("command", ["certify", "convert", "bounds"])
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exit_.value.code == 0
    assert "(default: 3,224,224)" in out and "(default: 0)" in out  # --input-shape, --seed
    if command != "bounds":
        assert "(default: fold)" in out and "(default: exact)" in out  # --bn, --separable


def test_unknown_torchvision_model_lists_close_matches(capsys):
    assert main(["bounds", "torchvision:resnet19", "--input-shape", "3,32,32"]) == 2
    err = capsys.readouterr().err
    assert "unknown torchvision model 'resnet19'" in err and "resnet18" in err
