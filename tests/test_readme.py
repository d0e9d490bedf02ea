"""README.md: it opens with the two commands, CI runs the first, and every Python block and
command in it runs as written (offline: the README's examples use the embedded model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

NOT_RUN = {
    "python3 -m venv": "the two opening commands: CI runs the first, test_the_main_job_renders the second's render",
    "pip install": "installs packages",
    "stable-diffusion-v1-5/": "downloads a model from the Hub",
    "Wan-AI/": "downloads a video model from the Hub (tests/test_wan.py runs a tiny one)",
    "hf_hub_download": "downloads weights from the Hub (tests/test_clear_release.py loads that layout offline)",
    "accelerate launch": "needs several processes or GPUs",
    "lindiff demo": "starts a server; tests/test_demo.py and tests/test_demo_browser.py test the demo",
}
"""Commands and Python blocks the suite does not run, by a text they contain, and why."""


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks of ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.DOTALL | re.MULTILINE)


def commands() -> list[str]:
    """Every command of the README's bash blocks (continued lines joined), in order."""
    lines = "\n".join(blocks("bash")).replace("\\\n", " ")
    return [line.strip() for line in lines.splitlines() if line.strip() and not line.startswith("#")]


def readme_commands() -> list[str]:
    block = re.match(r"# lindiff\n+```bash\n(.*?)\n```", README, re.DOTALL)
    assert block, "README.md must open with a bash block of the two commands"
    return block.group(1).splitlines()


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``command`` in bash in ``cwd``, with this interpreter's environment first on the PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)


def test_readme_opens_with_exactly_two_commands():
    tests, main_job = readme_commands()
    assert "pytest -q" in tests
    assert "bench/" in main_job or "lindiff render" in main_job


def test_ci_runs_the_readme_test_command():
    tests = readme_commands()[0]
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_is_for_users():
    assert len(README.splitlines()) <= 250


def test_the_main_job_renders(tmp_path):
    render = readme_commands()[1].split("&& .venv/bin/")[-1]
    assert render.startswith("lindiff render")
    for attempt in range(2):  # the second run finds the image in the manifest and skips it
        done = run(render, tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"{attempt} already done" in done.stdout
    assert len(list((tmp_path / "outputs").glob("*.png"))) == 1


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = blocks("python")[index]
    skipped = [why for text, why in NOT_RUN.items() if text in code]
    if skipped:
        pytest.skip(skipped[0])
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})


def test_commands_run_in_order(tmp_path):
    ran = []
    for command in commands():
        if any(text in command for text in NOT_RUN):
            continue
        done = run(command, tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        ran.append(command)
    assert any(command.startswith("lindiff render --reproduce") for command in ran)
    assert (tmp_path / "again").is_dir() and (tmp_path / "renders" / "manifest.jsonl").is_file()
