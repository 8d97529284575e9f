"""The recipes run end to end (short settings) and print their results."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    assert plot.exists() or "no plot" in out
