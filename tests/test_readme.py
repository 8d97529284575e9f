"""The README's commands are the ones CI runs, and its examples run."""

import os
import re
import subprocess
import sys

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


def test_readme_main_job_runs():
    setup = _blocks("bash")[0].strip()
    job = setup.split("&&")[-1].strip()  # the part after the install
    assert job.startswith("python ")
    result = subprocess.run([sys.executable] + job.split()[1:], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "layers bounded" in result.stdout


def test_readme_python_examples_run():
    for code in _blocks("python"):
        exec(compile(code, "README.md", "exec"), {})


def test_readme_cli_examples_run(tmp_path):
    commands = [b.strip() for b in _blocks("bash") if b.strip().startswith("lipfx ")]
    assert commands
    for cmd in commands:
        result = subprocess.run([sys.executable, "-m", "lipfx.cli"] + cmd.split()[1:], cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert "Lipschitz bound" in result.stdout
