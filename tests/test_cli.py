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
