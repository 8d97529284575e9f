"""The console script end to end, in a subprocess."""

import subprocess
import sys

import pytest

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


@pytest.mark.parametrize(
    "args,message",
    [
        (["bounds", "torchvision:nosuchnet"], "unknown torchvision model"),
        (["bounds", "resnet18"], "expected 'torchvision:NAME'"),
        (["bounds", "torchvision:resnet18", "--input-shape", "3,a,4"], "bad input shape"),
        (["bounds", "torchvision:resnet18", "--input-shape", "5,32,32"], "does not run"),
        (["bounds", "nosuchpkg.mod:make"], "cannot import"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message):
    res = _run(*args)
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_version():
    res = _run("--version")
    assert res.returncode == 0 and res.stdout.startswith("lipfx ")


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


@pytest.mark.parametrize(
    "args,message",
    [
        (["certify", "torchvision:nosuchnet"], "unknown torchvision model"),
        (["certify", "torchvision:resnet18", "--input-shape", "0,3"], "bad input shape"),
        (["certify", "torchvision:resnet18", "--input-shape", "5,32,32"], "does not run"),
        (["certify", "torchvision:squeezenet1_0", "--input-shape", "3,64,64", "--json", "/no/such/dir/x.json"], "cannot write"),
        (["certify", "torchvision:resnet18", "--K", "0"], "--K must be a positive"),
        (["certify", "torchvision:resnet18", "--K", "-2"], "--K must be a positive"),
    ],
)
def test_certify_bad_input_is_one_line(args, message):
    res = _run(*args)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("lipfx: error:")]
    assert len(errors) == 1 and message in errors[0]  # progress lines may precede it
    assert not [line for line in res.stderr.splitlines() if line.startswith((" ", "Original", "None", "While"))]
