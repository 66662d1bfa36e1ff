"""The commands the README and docs/ name exist: each `make` target, each `python -m` module, each
pipeline file given to `dvc repro`, and each relative link."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _text(page: Path) -> str:
    return page.read_text()


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_named_exists(page):
    named = set(re.findall(r"`make ([a-z][\w-]*)", _text(page)))
    named |= set(re.findall(r"^make ([a-z][\w-]*)", _text(page), re.M))
    missing = named - _make_targets()
    assert not missing, f"{page.name} names make targets the Makefile lacks: {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_module_named_exists(page):
    named = {m.rstrip(".") for m in re.findall(r"python -m ([A-Za-z_][\w.]*)", _text(page))}
    named.discard("pipeline")  # `python -m pipeline.<stage>`: the placeholder, not a module
    missing = [m for m in sorted(named) if importlib.util.find_spec(m) is None]
    assert not missing, f"{page.name} names modules that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_pipeline_file_and_relative_link_exists(page):
    text = _text(page)
    files = set(re.findall(r"dvc repro ([\w/.-]+\.yaml)", text))
    links = {m for m in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text)}
    links |= set(re.findall(r'<img src="([^"]+)"', text))
    missing = [f for f in sorted(files | links) if not (page.parent / f).exists() and not (REPO / f).exists()]
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_readme_is_a_front_door():
    text = _text(REPO / "README.md")
    assert len(text.encode()) <= 12 * 1024
    assert "make repro" in text and "make test" in text
    heads = re.findall(r"^## (\d)\. ", text, re.M)
    assert heads == [str(i) for i in range(1, 10)], heads


def test_make_clean_never_deletes_a_committed_file():
    import fnmatch
    import subprocess

    text = (REPO / "Makefile").read_text()
    recipe = text.split("\nclean:", 1)[1].split("\n\n", 1)[0]
    targets = [
        word
        for line in recipe.splitlines()
        if "rm " in line
        for word in line.split()
        if not word.startswith(("rm", "-"))
    ]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for target in targets:
        hit = [f for f in tracked if fnmatch.fnmatch(f, target) or f.startswith(target.rstrip("/") + "/")]
        assert not hit, f"make clean removes {target}, which holds committed files: {hit[:3]}"
