"""README.md opens with the two commands, and CI runs the first one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.match(r"# lindiff\n+```bash\n(.*?)\n```", text, re.DOTALL)
    assert block, "README.md must open with a bash block of the two commands"
    return block.group(1).splitlines()


def test_readme_opens_with_exactly_two_commands():
    tests, main_job = readme_commands()
    assert "pytest -q" in tests
    assert "bench/" in main_job or "lindiff render" in main_job


def test_ci_runs_the_readme_test_command():
    tests = readme_commands()[0]
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
