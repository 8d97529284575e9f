"""The recipes run end to end (short settings) and print their results."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the recipes run in this interpreter: they plot exactly when it has matplotlib (the [plot] extra)
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def check_plot(plot: Path, out: str) -> None:
    """With matplotlib the plot must be written (a real PNG); without it the recipe must say so."""
    if HAS_MATPLOTLIB:
        assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", out
    else:
        assert "no plot" in out and not plot.exists(), out


@pytest.mark.slow
def test_certified_classifier_recipe(tmp_path):
    plot = tmp_path / "curve.png"
    res = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "certified_classifier.py"), "--epochs", "2", "--plot", str(plot)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "certificate" in out and "clean accuracy" in out
    for eps in ("0.1 ", "0.1412", "0.25", "0.5"):
        assert f"certified @ eps={eps}" in out
    bound = float(out.split("final certificate:")[1].split()[0])
    assert 0 < bound <= 1.0  # the budget held through training
    check_plot(plot, out)


@pytest.mark.slow
def test_certified_cifar10_recipe_on_the_synthetic_stand_in(tmp_path):
    plot = tmp_path / "cifar.png"
    res = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "certified_cifar10.py"), "--data", "synthetic", "--epochs", "10",
         "--width", "8", "--depth", "1", "--batch", "64", "--lr", "1e-2", "--plot", str(plot)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for eps in ("0.1412", "0.2824", "0.4235"):  # 36/255, 72/255, 108/255
        assert f"certified @ eps={eps}" in out
    bound = float(out.split("certificate:")[1].split()[0])
    assert 0 < bound < math.inf
    clean = float(out.split("clean accuracy")[1].split("%")[0]) / 100
    assert clean > 0.2, out  # it learns (10 classes: chance is 0.10; measured 0.39)
    check_plot(plot, out)


@pytest.mark.slow
def test_iresnet_flow_2d_recipe(tmp_path):
    plot = tmp_path / "flow.png"
    res = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "iresnet_flow_2d.py"), "--steps", "60", "--blocks", "3", "--plot", str(plot)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    nll = float(out.split("test NLL (exact log-det):")[1].split()[0])
    gauss = float(out.split("best Gaussian:")[1].split(")")[0])
    assert nll < gauss + 0.5 and math.isfinite(nll)
    contractions = [float(c) for c in out.split("certified contraction per block (coeff 0.90):")[1].splitlines()[0].split()]
    assert len(contractions) == 3 and all(0 < c <= 0.9 for c in contractions)
    bound = float(out.split("certified error bound <=")[1].split()[0])
    assert bound <= 1e-4 and "converged: True" in out
    assert "RuntimeWarning" not in res.stderr
    check_plot(plot, out)


@pytest.mark.slow
def test_iresnet_classifier_recipe(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "iresnet_classifier.py"), "--epochs", "1", "--blocks", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "test accuracy" in out
    contractions = [float(c) for c in out.split("certified contraction per block (coeff 0.9):")[1].splitlines()[0].split()]
    assert len(contractions) == 2 and all(0 < c <= 0.9 for c in contractions)
    whole = float(out.split("certificate of the whole classifier (chain rule through every block):")[1].split()[0])
    assert 0 < whole < float("inf")
    assert float(out.split("certified error bound <=")[1].split()[0]) <= 1e-3 and "converged: True" in out
