"""End to end, the user's daily loop on a tiny sample in a fresh git copy of the repo:
`dvc repro --all-pipelines` (the study's search/dvc.yaml included), commit the baseline, `dvc exp run -S`
(which leaves the study alone), a queue of two run with `dvc queue start -j 2`, `dvc exp show` and
`make exp-show`, then the MLflow server's REST API and UI page on that store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.preset import merge
from tests.helpers.project import copy_project
from tests.helpers.services import mlflow_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    # No MLFLOW_TRACKING_URI: the stages use their default store, <repo>/mlflow.db.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME")}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


TINY = {
    "data": {"synthetic": {"n_events": 12, "events_per_file": 6}},
    "model": {"embed_dim": 16, "memory": {"slots": 8, "dim": 16}},
    "train": {
        "batch_size": 2,
        "val_max_batches": 1,
        "phase1": {"epochs": 1, "max_steps_per_epoch": 1},
        "phase2": {"epochs": 1, "max_steps_per_epoch": 1},
    },
    "evaluate": {"max_batches": 1, "batch_size": 2, "n_examples": 1},
    "search": {
        "n_trials": 2,
        "max_steps_per_epoch": 1,
        "val_max_batches": 1,
        "space": [
            {"key": "train.phase1.lr", "type": "logfloat", "low": 1e-4, "high": 3e-3},
            {"key": "model.dropout", "type": "float", "low": 0.0, "high": 0.15},
        ],
    },
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = copy_project(tmp_path_factory.mktemp("exp-project"), skip=("reports/", "dvc.lock", "search/dvc.lock"))
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params = merge(params, TINY)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-qm", "init")
    return dest


def _client(project: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client, client.get_experiment_by_name("sevir-nowcasting").experiment_id


def _parents(project: Path) -> dict:
    client, exp = _client(project)
    return {r.info.run_name: r for r in client.search_runs([exp], filter_string="tags.`pipeline.parent` = 'true'")}


def test_repro_runs_the_study_and_logs_a_full_parent_run(project: Path):
    out = _run([str(BIN / "dvc"), "repro", "--all-pipelines"], project)
    assert "Running stage 'search/dvc.yaml:search'" in out and "apply it with:" in out
    best = yaml.safe_load((project / "reports/search/best_params.yaml").read_text())
    assert best["storage"] == "artifacts/search/optuna.journal"  # the same in every clone
    assert best["command"].startswith("dvc exp run") and set(best["params"]) == {"train.phase1.lr", "model.dropout"}
    for name in ("trials.csv", "history.png", "importances.png", "parallel.png"):
        assert (project / "reports/search" / name).is_file()
    (parent,) = _parents(project).values()
    assert parent.data.params["model.embed_dim"] == "16" and parent.data.params["search.n_trials"] == "2"
    assert parent.info.status == "FINISHED" and parent.info.end_time - parent.info.start_time > 1000
    client, exp = _client(project)
    (study_run,) = client.search_runs([exp], filter_string="tags.`pipeline.stage` = 'search'")
    assert study_run.data.tags["mlflow.parentRunId"] == parent.info.run_id and "best_value" in study_run.data.metrics
    trials = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")
    assert len(trials) == 2 and all("train.phase1.lr" in t.data.params for t in trials)
    assert all(t.data.tags["optuna.state"] in ("COMPLETE", "PRUNED", "FAIL") for t in trials)
    # the baseline is committed, as a DVC project does: dvc.lock and the uncached outputs (reports/)
    _git(project, "add", "-f", "dvc.lock", "search/dvc.lock", "reports")
    _git(project, "commit", "-qm", "baseline run")


def test_exp_run_reruns_only_dependent_stages_and_is_its_own_parent_run(project: Path):
    out = _run([str(BIN / "dvc"), "exp", "run", "-n", "drop-more", "-S", "train.phase2.lr=0.00021"], project)
    for skipped in ("fetch", "chunk", "train_phase1"):
        assert f"Stage '{skipped}' didn't change, skipping" in out, out
    assert (
        "Stage 'search" not in out and "search/dvc.yaml" not in out
    )  # an experiment never runs, nor checks, the study
    assert "Running stage 'train_phase2'" in out
    runs = _parents(project)
    assert runs["drop-more"].data.params["train.phase2.lr"] == "0.00021"
    assert runs["drop-more"].data.tags["dvc.exp_name"] == "drop-more"


@pytest.mark.timeout(1800)
def test_two_queued_experiments_log_to_one_store_without_lock_errors(project: Path):
    for n in (1, 2):  # evaluate.n_examples differs from the baseline's (1): only evaluate reruns
        _run(
            [str(BIN / "dvc"), "exp", "run", "--queue", "-n", f"queued-{n}", "-S", f"evaluate.n_examples={n + 1}"],
            project,
        )
    _run([str(BIN / "dvc"), "queue", "start", "-j", "2"], project)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = _run([str(BIN / "dvc"), "queue", "status"], project)
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(3)
    assert status.count("Success") >= 2, status
    for n in (1, 2):
        logs = _run([str(BIN / "dvc"), "queue", "logs", f"queued-{n}"], project)
        assert "database is locked" not in logs
    runs = _parents(project)
    assert {"queued-1", "queued-2"} <= set(runs)
    assert runs["queued-2"].data.params["evaluate.n_examples"] == "3"


def test_exp_show_leads_with_scores_and_leaves_data_stats_out(project: Path):
    rows = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], project))
    workspace = rows[0]
    metrics = workspace["data"]["metrics"]
    assert list(metrics)[0] == "reports/metrics.json", list(metrics)  # the scores come first
    assert not any("chunk_stats" in name for name in metrics)
    text = json.dumps(metrics)
    assert "exceed_" not in text and "hist_" not in text  # data statistics are not metrics
    scores = metrics["reports/metrics.json"]["data"]
    assert {"csi_m", "mse"} <= set(scores["model"]) and "csi_m" in scores["persistence"]
    assert set(scores) == {"model", "persistence", "optical_flow", "model_vs_persistence", "model_vs_optical_flow"}
    # what `make exp-show` shows: the changed params, then the model's CSI-M, within 120 columns
    table = _run([str(BIN / "python"), "-m", "pipeline.exp_show", "--width", "120"], project)
    lines = table.splitlines()
    assert all(len(line) <= 120 for line in lines), table
    assert lines[0].split()[0] == "Experiment" and "CSI-M" in lines[0].split()
    assert "evaluate.n_examples" in lines[0] and "train.phase2.lr" in lines[0], table


def test_mlflow_server_serves_the_runs_params_and_headline_metrics(project: Path, tmp_path: Path):
    _, exp_id = _client(project)
    with mlflow_server(f"sqlite:///{project / 'mlflow.db'}", tmp_path) as url:
        body = json.dumps(
            {"experiment_ids": [exp_id], "filter": "tags.`pipeline.parent` = 'true'", "max_results": 50}
        ).encode()
        req = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            runs = {r["info"]["run_name"]: r for r in json.load(resp)["runs"]}
        assert {"drop-more", "queued-1", "queued-2"} <= set(runs)
        params = {p["key"]: p["value"] for p in runs["drop-more"]["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in runs["drop-more"]["data"].get("metrics", [])}
        assert params["train.phase2.lr"] == "0.00021" and "model.embed_dim" in params
        assert {"model.csi_m", "persistence.csi_m", "model.mse"} <= set(metrics)

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            pytest.skip("chromium not installed (Debian: apt-get install chromium; .ci/run does this)")
        page = f"{url}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        dom = subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'chrome'}",
                "--window-size=1600,1000",
                "--virtual-time-budget=20000",
                "--dump-dom",
                page,
            ],
            capture_output=True,
            text=True,
            timeout=400,
        ).stdout
        for name in ("drop-more", "queued-1", "queued-2"):
            assert name in dom, f"{name} not in the runs table page"
