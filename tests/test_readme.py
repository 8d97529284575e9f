"""The README's commands are the ones CI runs, and its examples run."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(lang: str) -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    setup, test_cmd = _blocks("bash")[:2]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f]
    assert test_cmd.strip() in ci_lines
    assert 'pip install -e ".[test,plot]"' in setup


def _numbers(line: str) -> tuple[list[str], list[float]]:
    words, values = [], []
    for token in line.split():
        try:
            values.append(float(token))
        except ValueError:
            words.append(token)
    return words, values


def test_readme_main_job_runs_and_prints_what_the_readme_shows():
    setup = _blocks("bash")[0].strip()
    job = setup.split("&&")[-1].strip()  # the part after the install
    assert job.startswith("lipfx certify torchvision:")
    result = subprocess.run([sys.executable, "-m", "lipfx.cli"] + job.split()[1:], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    shown = _blocks("text")[0].strip().splitlines()
    shown = [line for line in shown if not line.endswith(" s")]  # progress lines carry timings
    printed = result.stdout.strip().splitlines()
    assert len(printed) == len(shown)
    for got, want in zip(printed, shown):
        (got_words, got_values), (want_words, want_values) = _numbers(got), _numbers(want)
        assert got_words == want_words, (got, want)
        assert got_values == pytest.approx(want_values, rel=2e-3), (got, want)  # the table rounds to 4 digits


def test_readme_python_examples_run():
    from lipfx import ops

    for code in _blocks("python"):
        with ops.scoped():  # the extension example registers an op: keep it out of later tests
            exec(compile(code, "README.md", "exec"), {})


def test_readme_cli_examples_run(tmp_path):
    commands = [line.strip() for b in _blocks("bash") for line in b.strip().splitlines() if line.startswith("lipfx ")]
    assert len(commands) >= 2
    for cmd in commands:  # in order, in one directory: later commands read what earlier ones wrote
        result = subprocess.run([sys.executable, "-m", "lipfx.cli"] + cmd.split()[1:], cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (cmd, result.stderr)
        assert "Lipschitz bound" in result.stdout


def test_readme_ddp_script_runs_under_torchrun(tmp_path):
    """The README's DDP script, verbatim, with the torchrun command of its first line (2 gloo ranks)."""
    [script] = [b for b in _blocks("py") if "torchrun" in b]
    name, command = re.match(r"# (\S+), run with:\s+torchrun (.*)", script.splitlines()[0]).groups()
    (tmp_path / name).write_text(script)
    args = command.split()
    assert args[-1] == name and "--nproc_per_node=2" in args
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run"] + args, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    bound = float(re.search(r"certified bound: (\S+)", result.stdout).group(1))
    assert 0 < bound < 10
