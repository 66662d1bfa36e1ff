"""End to end: `dvc repro` of the DAG on a small embedded sample, in a fresh git copy of the repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.sevir.dataset import WindowDataset
from tests.helpers.project import copy_project

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # No MLFLOW_TRACKING_URI: the stages use their default store, <repo>/mlflow.db.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git clone-like copy of the tracked files, with a small synthetic sample configured."""
    dest = copy_project(tmp_path_factory.mktemp("project"))
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"]["synthetic"].update(n_events=12, size=128, events_per_file=6)
    # the default model, trained for two batches per phase: the stages run, the test stays quick
    params["train"]["val_max_batches"] = 1
    for phase in ("phase1", "phase2"):
        params["train"][phase].update(epochs=1, max_steps_per_epoch=2)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def test_repro_builds_every_stage_output(project: Path):
    _run([str(BIN / "dvc"), "repro"], project)
    assert (project / "data/raw/CATALOG.csv").is_file()
    assert sorted(p.name for p in (project / "data/windows").glob("*.h5")) == ["test.h5", "train.h5", "val.h5"]
    sample = WindowDataset(project / "data/windows/train.h5")[0]
    assert sample["inputs"].shape == (13, 1, 128, 128) and sample["targets"].shape == (12, 1, 128, 128)
    assert (project / "reports/data/chunk_stats.json").is_file()
    for phase in (1, 2):
        assert sorted(p.name for p in (project / f"artifacts/phase{phase}").glob("*.pt")) == ["best.pt", "last.pt"]
        assert json.loads((project / f"reports/train_phase{phase}.json").read_text())["epochs"] == 1
        assert (project / f"reports/train_phase{phase}_curve.csv").is_file()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert {"model", "persistence", "optical_flow"} <= set(metrics)
    assert json.loads((project / "reports/scores.json").read_text())["windows"] > 0  # the detail report
    assert (project / "reports/plots/gallery.png").is_file() and (project / "reports/per_lead/csi_m.csv").is_file()
    assert (project / "dvc.lock").is_file()


def test_repro_logs_each_stage_to_one_mlflow_parent_run(project: Path):
    assert (project / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sevir-nowcasting")
    stages = {
        r.info.run_name: r for r in client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.stage` != ''")
    }
    assert {"fetch", "chunk", "train_phase1", "train_phase2", "evaluate"} <= set(stages)
    dag = {
        "fetch",
        "chunk",
        "search",
        "train_phase1",
        "train_phase2",
        "evaluate",
    }  # not the Optuna trials (their study's)
    parents = {run.data.tags["mlflow.parentRunId"] for run in stages.values() if run.data.tags["pipeline.stage"] in dag}
    assert len(parents) == 1
    assert (
        len(
            MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_metric_history(
                stages["train_phase2"].info.run_id, "val.loss"
            )
        )
        == 1
    )
    assert stages["chunk"].data.metrics["train.windows"] > 0


def test_second_repro_does_nothing(project: Path):
    proc = _run([str(BIN / "dvc"), "repro"], project)
    out = proc.stdout + proc.stderr
    assert "didn't change, skipping" in out
    assert "Running stage" not in out
    status = _run([str(BIN / "dvc"), "status", "dvc.yaml"], project)  # the study's pipeline was not run here
    assert "up to date" in status.stdout


def test_changing_a_windows_param_reruns_chunk_and_the_training_after_it(project: Path):
    n_stride12 = len(WindowDataset(project / "data/windows/train.h5"))
    proc = _run([str(BIN / "dvc"), "exp", "run", "-S", "windows.stride=6"], project)
    out = proc.stdout + proc.stderr
    assert "Stage 'fetch' didn't change, skipping" in out
    assert "Running stage 'chunk'" in out
    assert "Running stage 'train_phase1'" in out and "Running stage 'train_phase2'" in out
    # 49 frames, window 25: stride 6 gives 5 windows per event, stride 12 gives 3
    assert len(WindowDataset(project / "data/windows/train.h5")) * 3 == n_stride12 * 5
