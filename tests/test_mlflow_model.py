"""The evaluate stage's MLflow model: loadable, registered, champion by test CSI-M; datasets and source tags."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import run_stage
from pipeline.evaluate import main
from pipeline.scoring import mlflow_log
from pipeline.scoring.forecasters import get_method, model_from_checkpoint
from tests.test_evaluate import IN, OUT, _stage_files, moving_storms, write_windows


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


def _evaluate(params) -> None:
    assert run_stage(main, ["--params", str(params)]) == 0


def _champion(client: MlflowClient) -> str:
    return client.get_model_version_by_alias(mlflow_log.REGISTERED_MODEL, mlflow_log.CHAMPION).version


def test_evaluate_logs_a_registered_model_equal_to_the_checkpoint(store, tmp_path):
    params = _stage_files(tmp_path)
    _evaluate(params)
    client = MlflowClient(store)
    (version,) = client.search_model_versions(f"name = '{mlflow_log.REGISTERED_MODEL}'")
    assert _champion(client) == version.version  # the first version becomes champion
    run = client.get_run(version.run_id)
    assert run.info.run_name == "evaluate" and "model.csi_m" in run.data.metrics
    assert version.tags["split"] == "test"
    assert float(version.tags[mlflow_log.CSI_TAG]) == pytest.approx(run.data.metrics["model.csi_m"])

    x = torch.from_numpy(moving_storms(1, IN, seed=5)).unsqueeze(2)  # (1, IN, 1, H, W) uint8
    expected = model_from_checkpoint(tmp_path / "artifacts" / "phase2" / "best.pt")(x, OUT)
    by_uri = get_method("model", model_uri=f"models:/{mlflow_log.REGISTERED_MODEL}@champion")
    assert by_uri.data == {"in_len": IN, "out_len": OUT, "height": 32, "width": 32}
    torch.testing.assert_close(by_uri(x, OUT), expected)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{mlflow_log.REGISTERED_MODEL}/{version.version}")
    out = pyfunc.predict(x.float().numpy() / 255.0)
    assert out.shape == (1, OUT, 1, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-6)
    inputs = pyfunc.metadata.get_input_schema().inputs
    assert inputs[0].shape == (-1, IN, 1, 32, 32) and inputs[0].type == np.dtype(np.float32)
    # weights and config only: no pickled module or python model in the logged files
    names = {
        a.path
        for a in mlflow.artifacts.list_artifacts(
            artifact_uri=f"models:/{mlflow_log.REGISTERED_MODEL}/{version.version}"
        )
    }
    assert not any(n.endswith(".pkl") for n in names)
    # the predict command takes the same URI
    from pipeline.predict import main as predict

    np.save(tmp_path / "x.npy", x[0, :, 0].numpy())
    out = tmp_path / "predict" / "f.npz"
    assert run_stage(predict, ["--npy", str(tmp_path / "x.npy"), "--model-uri", "models:/sevir-nowcaster@champion",
                               "--out", str(out), "--params", str(params)]) == 0  # fmt: skip
    with np.load(out) as z:
        np.testing.assert_array_equal(
            z["forecast"], np.rint(expected[0, :, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
        )


def test_champion_moves_only_on_a_better_csi_with_the_same_test_windows(store, tmp_path, capsys):
    params = _stage_files(tmp_path)
    _evaluate(params)
    client = MlflowClient(store)
    first = _champion(client)
    # the same checkpoint on the same windows scores the same: not better, the alias stays
    _evaluate(params)
    assert _champion(client) == first
    # a worse champion on the same windows: the next equal-digest run beats it
    client.set_model_version_tag(mlflow_log.REGISTERED_MODEL, first, mlflow_log.CSI_TAG, "-1.0")
    _evaluate(params)
    second = _champion(client)
    assert second != first
    # other test windows: not comparable, the alias stays even on a worse-scored champion
    client.set_model_version_tag(mlflow_log.REGISTERED_MODEL, second, mlflow_log.CSI_TAG, "-1.0")
    other = write_windows(tmp_path / "other" / "test.h5", moving_storms(6, IN + OUT, seed=9))
    other.replace(tmp_path / "windows" / "test.h5")  # a new file (the stage run in this process may hold the old one)
    capsys.readouterr()
    _evaluate(params)
    assert _champion(client) == second
    assert "scored on other test windows" in capsys.readouterr().err  # one line saying why
    versions = client.search_model_versions(f"name = '{mlflow_log.REGISTERED_MODEL}'")
    assert len({v.tags[mlflow_log.DIGEST_TAG] for v in versions}) == 2


def test_evaluate_run_has_the_windows_as_dataset_inputs_and_source_tags(store, tmp_path):
    import hashlib

    from pipeline.tracking import _git_rev

    params = _stage_files(tmp_path)
    (tmp_path / "windows" / "train.h5").write_bytes((tmp_path / "windows" / "val.h5").read_bytes())
    _evaluate(params)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(yaml.safe_load(params.read_text())["tracking"]["experiment"])
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.stage` = 'evaluate'")
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"windows/train", "windows/val", "windows/test"}
    test = inputs["windows/test"]
    assert test.dataset.digest == hashlib.md5((tmp_path / "windows" / "test.h5").read_bytes()).hexdigest()
    assert str(tmp_path / "windows" / "test.h5") in test.dataset.source
    assert {t.key: t.value for t in test.tags}["mlflow.data.context"] == "test"
    # the pipeline's parent run carries them too: its row in the runs table shows the data it was scored on
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    on_parent = {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs}
    assert on_parent == {name: d.dataset.digest for name, d in inputs.items()}
    version = client.search_model_versions(f"run_id = '{run.info.run_id}'")[0]
    assert version.tags[mlflow_log.DIGEST_TAG] == test.dataset.digest
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "pipeline/evaluate.py" and tags["mlflow.source.type"] == "LOCAL"
    rev = _git_rev()
    if rev:  # a git checkout (CI and development): the commit and branch are on the run
        assert tags["mlflow.source.git.commit"] == rev
        assert "git.branch" in tags or "detached" not in rev


def test_source_tags_outside_a_git_repository_are_just_the_source(tmp_path, monkeypatch):
    from pipeline import tracking

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert tracking.source_tags("chunk") == {"mlflow.source.type": "LOCAL", "mlflow.source.name": "pipeline/chunk.py"}
    assert tracking.source_tags("train_phase2")["mlflow.source.name"] == "pipeline/train.py"
