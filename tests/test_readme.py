"""The README's set-up commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.*)'$", ci, re.MULTILINE).group(1)
    readme_lines = (ROOT / "README.md").read_text().splitlines()
    assert command in readme_lines
    # the two commands come first, before any other section
    assert readme_lines.index(command) < next(i for i, line in enumerate(readme_lines) if line.startswith("## "))
    assert "pytest" in command and ".[test]" in command
