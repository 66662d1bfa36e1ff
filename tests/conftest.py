"""Shared fixtures: the repository root and a params.yaml writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def write_params(tmp_path: Path):
    """Write a params file holding the repo's params.yaml with ``overrides`` merged in (nested dicts)."""

    def _write(overrides: dict | None = None, name: str = "params.yaml") -> Path:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        _merge(params, overrides or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return _write


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
