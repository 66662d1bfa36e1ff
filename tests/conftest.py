"""Shared fixtures: the repository root and a params.yaml writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.preset import merge

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _mlflow_store_in_tmp(tmp_path_factory, monkeypatch):
    """No test writes an MLflow store into the repository."""
    store = tmp_path_factory.getbasetemp() / "mlflow"
    store.mkdir(exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def write_params(tmp_path: Path):
    """Write a params file holding the repo's params.yaml with ``overrides`` merged in (nested dicts)."""

    def _write(overrides: dict | None = None, name: str = "params.yaml") -> Path:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params = merge(params, overrides or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return _write


@pytest.fixture
def one_torch_thread():
    """Run a test with one intra-op torch thread, restoring the previous count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
