"""MLflow tracking: stage runs of one pipeline run nest under one parent; params are flat."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import config, tracking
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    # One store for the module: creating the sqlite schema takes seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


@pytest.fixture
def store(store_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return store_uri


@pytest.fixture
def experiment(request) -> dict:
    """A tracking section with an experiment of this test's own."""
    return {"tracking": {"experiment": request.node.name}}


def _runs(uri: str, experiment: dict):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment["tracking"]["experiment"])
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_stages_of_one_pipeline_share_a_parent_run(store, experiment):
    cfg = config.from_dict(experiment)
    for stage in ("fetch", "chunk"):
        with tracking.stage_run(cfg, stage, ("windows",)) as mlflow:
            mlflow.log_metrics({"events": 3.0})
    runs = _runs(store, experiment)
    parents = {runs[s].data.tags["mlflow.parentRunId"] for s in ("fetch", "chunk")}
    assert len(parents) == 1
    (parent,) = parents
    assert runs["chunk"].data.params["windows.in_len"] == "13"
    assert runs["fetch"].data.metrics["events"] == 3.0
    assert any(r.info.run_id == parent for r in runs.values())


def test_different_params_give_a_different_parent(store, experiment):
    for stride in (12, 6):
        with tracking.stage_run(config.from_dict({**experiment, "windows": {"stride": stride}}), "chunk"):
            pass
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment["tracking"]["experiment"])
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.parent` = 'true'")
    assert len(parents) == 2


def test_dvc_experiment_name_names_the_parent(store, experiment, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "wide-model")
    with tracking.stage_run(config.from_dict(experiment), "fetch"):
        pass
    runs = _runs(store, experiment)
    assert "wide-model" in runs
    assert runs["fetch"].data.tags["dvc.exp_name"] == "wide-model"


def test_failed_stage_marks_its_run_failed(store, experiment):
    with pytest.raises(RuntimeError), tracking.stage_run(config.from_dict(experiment), "chunk"):
        raise RuntimeError("boom")
    assert _runs(store, experiment)["chunk"].info.status == "FAILED"


def test_relative_sqlite_uri_is_anchored_at_dvc_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_default_store_is_under_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_tracking_can_be_switched_off(store, experiment):
    off = {"tracking": {**experiment["tracking"], "enabled": False}}
    with tracking.stage_run(config.from_dict(off), "fetch") as mlflow:
        mlflow.log_metrics({"x": 1.0})
    assert MlflowClient(store).get_experiment_by_name(experiment["tracking"]["experiment"]) is None


def test_unusable_store_names_the_key(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlflow.db'}")
    with pytest.raises(PipelineError, match="tracking.uri"), tracking.stage_run(config.from_dict({}), "fetch"):
        pass


def test_flatten_turns_sections_into_dotted_strings():
    flat = tracking.flatten("model", config.from_dict({}).model)
    assert flat["model.heads"] == "[4, 8]"
    assert flat["model.memory.slots"] == "100"


def test_numeric_metrics_keep_numbers_under_dotted_names():
    stats = {"train": {"windows": 144, "exceed_16": 0.3}, "frame_height": 128, "split": "train", "ok": True}
    assert tracking.numeric_metrics(stats) == {"train.windows": 144.0, "train.exceed_16": 0.3, "frame_height": 128.0}


def test_parent_run_carries_every_params_key_and_spans_its_stages(store, experiment):
    cfg = config.from_dict(experiment)
    for stage in ("fetch", "chunk"):
        with tracking.stage_run(cfg, stage):
            time.sleep(0.3)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment["tracking"]["experiment"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.parent` = 'true'")
    assert set(parent.data.params) == set(tracking.flatten("", cfg))  # every params.yaml key, flattened
    assert parent.data.params["train.phase1.lr"] == str(cfg.train.phase1.lr)
    stages = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.stage` != ''")
    assert parent.info.status == "FINISHED"
    assert (
        parent.info.end_time >= max(r.info.end_time for r in stages)
        and parent.info.end_time - parent.info.start_time >= 600
    )


def test_runs_table_link_opens_the_model_training_view():
    assert tracking.runs_table_url("http://localhost:5000/", "7") == (
        "http://localhost:5000/#/experiments/7/runs?workflowType=machine_learning"
    )


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        (
            "postgresql://team:secret@127.0.0.1:9/mlflow",
            "tracking.uri = postgresql://team:***@127.0.0.1:9/mlflow: database not reachable",
        ),
        ("http://127.0.0.1:9", "tracking.uri = http://127.0.0.1:9: MLflow server not reachable"),
        ("mssql://u@h/db", "database driver 'pyodbc' is not installed"),
        ("gopher://x", "unknown scheme 'gopher'"),
    ],
)
def test_unusable_tracking_url_is_one_line_naming_the_key(uri, says, write_params, tmp_path):
    params = write_params({"tracking": {"uri": uri}})
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.chunk", "--params", str(params)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "secret" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_concurrent_writers_share_one_sqlite_store(tmp_path):
    """Three processes log two stages each into one new sqlite store at once: no 'database is locked'."""
    script = (
        "import os, sys; from pipeline import config, tracking\n"
        "os.environ['DVC_EXP_NAME'] = sys.argv[1]\n"
        "cfg = config.from_dict({})\n"
        "for stage in ('fetch', 'chunk'):\n"
        "    with tracking.stage_run(cfg, stage) as mlflow:\n"
        "        for i in range(40):\n"
        "            mlflow.log_metrics({'a': float(i), 'b': float(i)}, step=i)\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'shared.db'}", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"exp-{i}"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(3)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    client = MlflowClient(f"sqlite:///{tmp_path / 'shared.db'}")
    exp = client.get_experiment_by_name("sevir-nowcasting")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.parent` = 'true'")
    assert sorted(r.info.run_name for r in parents) == ["exp-0", "exp-1", "exp-2"]
    stages = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.stage` != ''")
    assert len(stages) == 6 and all(len(client.get_metric_history(r.info.run_id, "a")) == 40 for r in stages)
