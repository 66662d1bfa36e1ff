"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Stages are separate processes (DVC runs each as its own command), so the parent
run is found again by a key: the DVC experiment name under ``dvc exp run``,
otherwise a hash of the git revision and the params file. Every stage run of
one ``dvc repro`` therefore lands under the same parent, and pipelines with
different params sit side by side in the MLflow UI.

Locations are absolute and built from ``DVC_ROOT`` (set by DVC, also inside the
temporary copies of ``dvc exp run --queue``), so a queued run does not write
its store into a directory that is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.tracking")

KEY_TAG = "pipeline.key"
PARENT_TAG = "pipeline.parent"


def project_root() -> Path:
    """The repository root: ``$DVC_ROOT`` under DVC, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(uri: str | None) -> str:
    """``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``."""
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return f"sqlite:///{project_root() / uri[len('sqlite:///'):]}"
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested params -> ``{"model.embed_dim": "32", ...}`` (MLflow params are flat strings)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list) else str(value)}


def numeric_metrics(stats: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested stats -> ``{"train.windows": 144.0, ...}``, keeping numbers only (MLflow metrics are floats)."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def pipeline_key(cfg: Config) -> str:
    """Identifies one pipeline run across its stage processes."""
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return f"exp:{exp}"
    rev = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=project_root(), timeout=10).stdout.strip()
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True) + rev
    return "params:" + hashlib.sha1(blob.encode()).hexdigest()[:16]


def _experiment_id(client: Any, name: str) -> str:
    import mlflow

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=(project_root() / "mlruns").as_uri())
    except mlflow.exceptions.MlflowException:  # another stage process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _parent_run_id(client: Any, experiment_id: str, key: str) -> str:
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{PARENT_TAG}` = 'true'", max_results=1
    )
    if found:
        return found[0].info.run_id
    name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{key.split(':')[-1][:8]}"
    run = client.create_run(experiment_id, run_name=name, tags={KEY_TAG: key, PARENT_TAG: "true"})
    client.set_terminated(run.info.run_id)  # a grouping run: it holds no work of its own
    return run.info.run_id


class _NoTracking:
    """Stands in for the ``mlflow`` module when ``tracking.enabled`` is false: every call is a no-op."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, sections: tuple[str, ...] = ()) -> Iterator[Any]:
    """Open an MLflow run for ``stage`` nested under this pipeline run's parent; yields the ``mlflow`` module.

    The params of ``sections`` (e.g. ``("data", "windows")``) are logged. A failing stage ends its run
    as FAILED. An unreachable tracking store is a :class:`PipelineError` naming ``tracking.uri``.
    """
    if not cfg.tracking.enabled:
        yield _NoTracking()
        return
    import mlflow
    from mlflow.tracking import MlflowClient
    from sqlalchemy.exc import SQLAlchemyError

    uri = tracking_uri(cfg.tracking.uri)
    for noisy in ("alembic", "mlflow.store.db.utils"):  # schema set-up chatter on a new store
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        experiment_id = _experiment_id(client, cfg.tracking.experiment)
        key = pipeline_key(cfg)
        parent = _parent_run_id(client, experiment_id, key)
    except (mlflow.exceptions.MlflowException, OSError, SQLAlchemyError) as err:
        raise PipelineError(f"tracking.uri = {uri}: MLflow store not usable ({str(err).splitlines()[0]}); fix tracking.uri or MLFLOW_TRACKING_URI") from None
    tags = {KEY_TAG: key, "pipeline.stage": stage}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=stage, parent_run_id=parent, tags=tags,
        log_system_metrics=cfg.tracking.log_system_metrics,
    ) as run:
        params: dict[str, str] = {}
        for section in sections:
            params.update(flatten(section, getattr(cfg, section)))
        if params:
            mlflow.log_params(params)
        log.info("mlflow: run %s (%s) under parent %s at %s", run.info.run_id[:8], stage, parent[:8], uri)
        yield mlflow
