"""The README's two commands: CI runs exactly the test command, and both install torch==2.13.0 first."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command(after: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(after) + r"\s*```bash\n(.+?)\n```", text, re.S)
    assert match, f"no bash block after {after!r} in README.md"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_command("Tests:")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
    assert command.startswith("pip install torch==2.13.0 && ")


def test_main_command_installs_cpu_torch_first_and_runs_the_quickstart():
    command = readme_command("build of torch on a CPU machine):")
    assert command.startswith("pip install torch==2.13.0 && pip install -e . && ")
    assert "configs/quickstart.yaml" in command and (ROOT / "configs" / "quickstart.yaml").is_file()


def test_project_requires_a_torch_range_not_a_pin():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.4"' in pyproject and "torch==" not in pyproject
