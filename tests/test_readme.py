"""The README's two commands: CI runs exactly the test command in a virtual environment of its own, both
install torch==2.13.0 first; the requirements' ranges and the tested constraints agree."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

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


def dependencies() -> dict[str, str]:
    """pyproject's requirements (the test extra included): name -> version specifier."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.+?)^\]", text, re.S | re.M).group(1)
    block += re.search(r"^test = \[(.+?)\]", text, re.M).group(1)
    specs = [Requirement(s) for s in re.findall(r'"([^"]+)"', block)]
    return {canonicalize_name(r.name): str(r.specifier) for r in specs}


def test_project_requires_a_torch_range_not_a_pin():
    spec = dependencies()["torch"]
    assert ">=2.4" in spec and "==" not in spec


@pytest.mark.parametrize("name", ["torch", "transformers", "accelerate", "peft", "datasets", "sacrebleu", "pytest", "pytest-xdist"])
def test_libraries_whose_next_major_release_may_break_the_api_have_an_upper_bound(name):
    assert "<" in dependencies()[name], f"{name}: no upper bound in pyproject.toml"


def test_constraints_pin_every_requirement_inside_its_range():
    """constraints.txt is the exact set the suite was last green with: every requirement pinned, each pin
    inside pyproject's range (so `pip install -c constraints.txt -e .[test]` can never conflict)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    for name, spec in dependencies().items():
        assert name in pins, f"constraints.txt does not pin {name}"
        assert SpecifierSet(spec).contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {spec}"
    assert "constraints.txt" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_installs_into_a_virtual_environment_of_its_own():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    venv = next(i for i, line in enumerate(lines) if " -m venv " in line)
    activate = next(i for i, line in enumerate(lines) if line.startswith("source ") and "activate" in line)
    assert venv < activate < lines.index(readme_command("Tests:"))
