"""notebooks/compare_runs.ipynb runs top to bottom against a store holding two pipeline runs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from pipeline import config, tracking

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_runs.ipynb"


def test_compare_runs_notebook_lines_up_two_pipelines(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    for stride in (12, 6):
        cfg = config.from_dict({"windows": {"stride": stride}})
        with tracking.stage_run(cfg, "chunk", ("windows",)) as mlflow:
            mlflow.log_metrics({"train.windows": 36.0 if stride == 12 else 60.0})
    namespace: dict = {}
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)
    assert len(namespace["wide"]) == 2
    assert sorted(namespace["wide"]["chunk/train.windows"]) == [36.0, 60.0]
    assert list(namespace["differing"].columns) == ["params.windows.stride"]
