"""pyproject.toml: an installable package (pipeline, models) whose dependencies the lock pins, runtime
apart from test and development."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _lock_parts() -> tuple[set[str], set[str]]:
    runtime, dev, part = set(), set(), None
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.startswith("# ---- "):
            part = runtime if "runtime" in line else dev
        elif line.strip() and not line.startswith("#"):
            assert part is not None, f"a pin before the first part header: {line}"
            part.add(canonicalize_name(re.split(r"[=<>!~\[; ]", line)[0]))
    return runtime, dev


def test_pyproject_builds_the_two_packages_with_setuptools():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["pipeline*", "models*"]
    for script in project["project"]["scripts"].values():
        module, func = script.split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func)), script


def test_dependencies_are_pinned_in_the_lock_runtime_apart_from_dev():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime, dev = _lock_parts()
    assert runtime and dev and not runtime & dev
    for req in map(Requirement, project["dependencies"]):
        assert canonicalize_name(req.name) in runtime, (
            f"{req.name}: a runtime dependency not in the lock's runtime part"
        )
    for req in map(Requirement, project["optional-dependencies"]["dev"]):
        assert canonicalize_name(req.name) in dev | runtime, f"{req.name}: not pinned in the lock"
    assert {"pytest", "ruff", "moto"} <= dev and not {"pytest", "ruff", "moto"} & runtime
