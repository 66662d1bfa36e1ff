"""Scale-out on a real PostgreSQL server (Debian package, started here on loopback):
an Optuna study worked by two processes, and the MLflow tracking server on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import config, tracking
from tests.helpers.services import create_database, mlflow_server, postgres_server

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as url:
        yield url


def test_two_processes_work_one_study_on_postgres_without_duplicates_or_losses(postgres, write_params, tmp_path):
    url = create_database(postgres, "optuna")
    params = write_params(
        {
            "search": {
                "n_trials": 8,
                "pruner": "none",
                "space": [
                    {"key": "train.phase1.lr", "type": "logfloat", "low": 1e-4, "high": 1e-2},
                    {"key": "model.embed_dim", "type": "categorical", "choices": [32, 48]},
                ],
            },
            "tracking": {"enabled": False},
        }
    )
    cmd = [sys.executable, "-m", "tests.helpers.search_worker", str(params), url]
    first = subprocess.Popen(
        [*cmd, str(tmp_path / "w1.json"), "--sleep", "0.5"], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    time.sleep(2.0)
    second = subprocess.Popen(
        [*cmd, str(tmp_path / "w2.json"), "--sleep", "0.5", "--join"], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    for proc in (first, second):
        assert proc.wait(timeout=180) == 0, proc.stderr.read()
    ran = [json.loads((tmp_path / f"w{i}.json").read_text())["ran"] for i in (1, 2)]
    assert ran[0] and ran[1] and not set(ran[0]) & set(ran[1])
    study_name = json.loads((tmp_path / "w1.json").read_text())["study"]
    study = optuna.load_study(study_name=study_name, storage=url)
    assert sorted(ran[0] + ran[1]) == [t.number for t in study.trials] == list(range(8))
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 8


def _stage_runs(cfg) -> None:
    for stage, metrics in (("fetch", {"events": 12.0}), ("chunk", {"train.windows": 36.0})):
        with tracking.stage_run(cfg, stage, ("windows",)) as mlflow:
            mlflow.log_metrics(metrics)


def test_mlflow_on_postgres_directly_and_through_the_tracking_server(postgres, tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    backend = create_database(postgres, "mlflow")
    # stages writing straight into the PostgreSQL store
    _stage_runs(config.from_dict({"tracking": {"uri": backend, "experiment": "direct"}}))
    with mlflow_server(backend, tmp_path) as server:
        # and through the server, as a team's workers would
        _stage_runs(config.from_dict({"windows": {"stride": 6}, "tracking": {"uri": server, "experiment": "served"}}))
        for name, stride in (("direct", "12"), ("served", "6")):
            body = json.dumps({"experiment_names": []}).encode()
            req = urllib.request.Request(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
            with urllib.request.urlopen(req, timeout=30) as resp:
                exp = json.load(resp)["experiment"]
            assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
            body = json.dumps(
                {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`pipeline.parent` = 'true'"}
            ).encode()
            req = urllib.request.Request(
                f"{server}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                (parent,) = json.load(resp)["runs"]
            params = {p["key"]: p["value"] for p in parent["data"]["params"]}
            assert params["windows.stride"] == stride and params["model.embed_dim"] == "32"
            assert parent["info"]["status"] == "FINISHED"
