"""MLflow tracking: stage runs of one pipeline run nest under one parent; params are flat."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline import config, tracking
from pipeline.errors import PipelineError


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
