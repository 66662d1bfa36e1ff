"""Evaluation results into MLflow: everything in the nested ``evaluate`` run, the headline in the parent.

The nested run gets every number of metrics.json as a metric (``model.csi_m``, ``model.csi.16``,
``model_vs_baselines.persistence.csi_m_ratio``, ...), the per-lead curves as stepped metrics
(``model.lead.csi_m`` at step = lead time in minutes, the tables' ``lead_min``: 10, 20, ... for
10-minute frames) and the report files as artifacts. The
pipeline's parent run gets the headline numbers (``<forecaster>.csi_m``, ``.hss_m``, ``.mse``,
``.ssim``, ``.csi.<T>``, and the model's CSI-M ratio to each baseline), so the MLflow compare view
lines pipeline runs up side by side. Scores of the val split are prefixed ``val.`` in the parent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.tracking import numeric_metrics

log = logging.getLogger("pipeline.scoring.mlflow_log")

HEADLINE_KEYS = ("csi_m", "hss_m", "mse", "ssim")


def headline_metrics(doc: dict[str, Any], split: str = "test") -> dict[str, float]:
    """The numbers the parent run carries (undefined scores are left out)."""
    prefix = "" if split == "test" else f"{split}."
    out: dict[str, float] = {}
    for name, block in doc.items():
        if not isinstance(block, dict) or "csi_m" not in block:
            continue
        for key in HEADLINE_KEYS:
            if block.get(key) is not None:
                out[f"{prefix}{name}.{key}"] = float(block[key])
        for thr, value in block["csi"].items():
            if value is not None:
                out[f"{prefix}{name}.csi.{thr}"] = float(value)
    for base, gaps in doc.get("model_vs_baselines", {}).items():
        if gaps.get("csi_m_ratio") is not None:
            out[f"{prefix}model_vs_{base}.csi_m_ratio"] = float(gaps["csi_m_ratio"])
    return out


def log_evaluation(mlflow: Any, doc: dict[str, Any], tables: dict[str, list[dict[str, Any]]], split: str,
                   files: Sequence[Path], reports_dir: Path) -> None:  # fmt: skip
    """Log to the active (nested) run and to its parent; a no-op when tracking is off."""
    run = mlflow.active_run()
    if run is None:  # tracking.enabled: false
        return
    mlflow.log_metrics(numeric_metrics(doc))
    for j, row in enumerate(next(iter(tables.values()))):
        step = int(row["lead_min"])
        stepped = {f"{name}.lead.{metric}": rows[j][name]
                   for metric, rows in tables.items() for name in rows[j] if name != "lead_min"}  # fmt: skip
        mlflow.log_metrics({k: float(v) for k, v in stepped.items() if v is not None}, step=step)
    for path in files:
        rel = Path(path).parent.relative_to(reports_dir) if Path(path).is_relative_to(reports_dir) else Path()
        mlflow.log_artifact(str(path), artifact_path=None if str(rel) == "." else str(rel))
    parent = mlflow.get_parent_run(run.info.run_id)
    if parent is None:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    headline = headline_metrics(doc, split)
    MlflowClient().log_batch(parent.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in headline.items()])
    log.info("mlflow: %d headline metrics on the parent run %s", len(headline), parent.info.run_id[:8])
