"""environment.yml and pyproject.toml list the same dependencies."""

from __future__ import annotations

import tomllib

import yaml
from packaging.requirements import Requirement

from imba.reproduce import REPO_ROOT


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    expected = set(project["dependencies"])
    for extra in ("book", "test"):
        expected |= set(project["optional-dependencies"][extra])

    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    listed = {d for d in pip_sections[0] if d != "-e ."}
    assert listed == expected
    assert "python=3.11" in env["dependencies"]


def test_torch_pinned_to_cpu_wheel_version():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    torch_specs = [d for d in project["dependencies"] if Requirement(d).name == "torch"]
    assert torch_specs == ["torch==2.13.0"]
