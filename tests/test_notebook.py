"""notebooks/compare_runs.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel)
against a store holding two pipeline runs with evaluation scores, and an Optuna study."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import torch
from nbclient import NotebookClient

from pipeline import config, tracking
from pipeline.scoring import ScoreAccumulator
from pipeline.scoring.mlflow_log import log_evaluation
from pipeline.scoring.reports import metrics_document, per_lead_tables

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "compare_runs.ipynb"


def _scores(shift: int, out_len: int = 4) -> dict:
    """Real scores of a model (the target moved by ``shift`` pixels) and persistence on moving blobs."""
    rng = np.random.default_rng(0)
    frames = np.zeros((2, 1 + out_len, 1, 32, 32), np.uint8)
    for t in range(1 + out_len):
        frames[:, t, 0, 8 + t : 20 + t, 6 + 2 * t : 18 + 2 * t] = rng.integers(100, 230, size=(2, 12, 12))
    target = torch.from_numpy(frames[:, 1:])
    forecasts = {
        "model": torch.roll(target, shifts=shift, dims=-1),
        "persistence": torch.from_numpy(frames[:, :1]).expand_as(target),
    }
    out = {}
    for name, pred in forecasts.items():
        acc = ScoreAccumulator(thresholds=(16, 133), pool_sizes=(4,), out_len=out_len, ssim=False)
        acc.update(pred, target)
        out[name] = acc.compute()
    return out


def test_compare_runs_notebook_executes_in_a_kernel(tmp_path, monkeypatch, write_params):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    for embed, shift in ((32, 0), (64, 2)):
        cfg = config.from_dict({"model": {"embed_dim": embed}})
        scores = _scores(shift)
        doc = metrics_document(scores, windows=2)
        with tracking.stage_run(cfg, "evaluate", ("evaluate",)) as mlflow:
            log_evaluation(mlflow, doc, per_lead_tables(scores), "test", files=[], reports_dir=tmp_path)
    journal = tmp_path / "optuna.journal"
    params = write_params(
        {
            "search": {
                "n_trials": 3,
                "pruner": "none",
                "space": [{"key": "train.phase1.lr", "type": "logfloat", "low": 1e-4, "high": 1e-2}],
            },
            "tracking": {"enabled": False},
        }
    )
    subprocess.run(
        [sys.executable, "-m", "tests.helpers.search_worker", str(params), str(journal), str(tmp_path / "w.json")],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )

    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into outputs
    for key, value in {"MLFLOW_TRACKING_URI": uri, "SEVIR_STUDY_STORAGE": str(journal)}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits them
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = {
        i: "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", []))
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
    }
    text = "\n".join(outputs.values())
    assert "model.embed_dim" in text and "model.csi_m" in text and "persistence.csi_m" in text
    assert "3 trials" in text and "best params" in text
    images = [
        o
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 3  # CSI-M bars, per-lead curves, study history
