"""Forecasters, checkpoint reading, and stage evaluate end to end on a small windows file."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import models
from models.config import ModelConfig
from pipeline.cli import run_stage
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.evaluate import main
from pipeline.scoring import ScoreAccumulator
from pipeline.scoring.evaluation import open_windows
from pipeline.scoring.forecasters import OpticalFlow, Persistence, get_method
from pipeline.training.checkpoint import load_model, read_checkpoint

IN, OUT, SIZE = 4, 3, 32
TINY_MODEL = {
    "name": "convlstm",
    "patch_size": 4,
    "residual": False,
    "motion": False,
    "prior": {"kind": "none"},
    "convlstm": {"hidden": [4], "kernel_size": 3},
}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def moving_storms(n_events: int, frames: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """(E, F, H, W) uint8 VIL: Gaussian cells drifting 1 pixel right and down per frame, peaks up to 240."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    vil = np.zeros((n_events, frames, size, size), np.float64)
    for e in range(n_events):
        for _ in range(3):
            cy, cx, peak, sigma = *rng.uniform(4, size - 12, 2), rng.uniform(120, 240), rng.uniform(2.5, 4.5)
            for f in range(frames):
                vil[e, f] += peak * np.exp(-((yy - cy - f) ** 2 + (xx - cx - f) ** 2) / (2 * sigma**2))
    return vil.clip(0, 255).round().astype(np.uint8)


def write_windows(path: Path, vil: np.ndarray, in_len: int = IN, out_len: int = OUT) -> Path:
    """A split file in stage chunk's layout, one window per event starting at frame 0."""
    n = len(vil)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("vil", data=vil, chunks=(1, 1, *vil.shape[2:]) if n else None, maxshape=(None, *vil.shape[1:]))
        f.create_dataset("event_id", data=np.array([f"S{i:04d}".encode() for i in range(n)], dtype="S8"))
        f.create_dataset("time_utc", data=np.arange(n, dtype=np.int64))
        f.create_dataset("frame_offset", data=np.zeros(n, np.int32))
        f.create_dataset("window_event", data=np.arange(n, dtype=np.int32))
        f.create_dataset("window_start", data=np.zeros(n, np.int32))
        f.attrs.update(in_len=in_len, out_len=out_len, stride=12, window_len=in_len + out_len,
                       long_len=in_len + out_len, downsample=1, scale="uint8 0-255; divide by 255")  # fmt: skip
    return path


def write_checkpoint(path: Path, model_overrides: dict | None = None, in_len: int = IN, out_len: int = OUT,
                     size: int = SIZE) -> Path:  # fmt: skip
    """A phase-2 checkpoint dict of the training contract (CONTRACTS.md section 1)."""
    cfg = ModelConfig.model_validate({**TINY_MODEL, **(model_overrides or {})})
    torch.manual_seed(0)
    model = models.build(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "model": model.state_dict(), "model_config": cfg.model_dump(mode="json"),
                "data": {"in_len": in_len, "out_len": out_len, "height": size, "width": size},
                "config_hash": "test", "phase": 2, "epoch": 1, "step": 10, "best_key": "val.csi_m", "best_score": 0.1,
                "optimizer": {}}, path)  # fmt: skip
    return path


# ------------------------------------------------------------------ forecasters
def test_persistence_repeats_the_last_input_frame_and_keeps_uint8():
    inputs = torch.from_numpy(moving_storms(2, IN)).unsqueeze(2)  # (2, IN, 1, H, W)
    out = Persistence()(inputs, 5)
    assert out.shape == (2, 5, 1, SIZE, SIZE) and out.dtype == torch.uint8
    assert torch.equal(out[:, 3], inputs[:, -1])


def test_persistence_scores_the_same_from_uint8_and_from_0_1_inputs():
    vil = torch.from_numpy(moving_storms(3, IN + OUT)).unsqueeze(2)
    inputs, truth = vil[:, :IN], vil[:, IN:]
    scored = []
    for x in (inputs, inputs.float() / 255):
        acc = ScoreAccumulator(out_len=OUT, pool_sizes=(4,), ssim=False)
        acc.update(Persistence()(x, OUT), truth)
        scored.append(acc.compute())
    assert scored[0]["csi"] == scored[1]["csi"] and scored[0]["csi_pool4"] == scored[1]["csi_pool4"]


def test_optical_flow_follows_moving_storms_better_than_persistence():
    vil = torch.from_numpy(moving_storms(2, IN + OUT, size=48, seed=1)).unsqueeze(2)
    inputs, truth = vil[:, :IN], vil[:, IN:]
    flow = OpticalFlow()(inputs, OUT)
    assert flow.shape == (2, OUT, 1, 48, 48) and flow.dtype == torch.float32
    assert 0 <= float(flow.min()) and float(flow.max()) <= 1
    scores = {}
    for name, forecast in {"flow": flow, "persistence": Persistence()(inputs, OUT)}.items():
        acc = ScoreAccumulator(thresholds=(74,), out_len=OUT, pool_sizes=(), ssim=False)
        acc.update(forecast, truth)
        scores[name] = acc.compute()
    assert scores["flow"]["csi"]["74"] > scores["persistence"]["csi"]["74"] + 0.1
    assert scores["flow"]["mse"] < scores["persistence"]["mse"]


def test_get_method_builds_baselines_by_name_and_rejects_others():
    assert isinstance(get_method("persistence"), Persistence)
    assert isinstance(get_method("optical_flow"), OpticalFlow)
    with pytest.raises(ValueError, match="unknown forecaster 'climatology'"):
        get_method("climatology")


# ------------------------------------------------------------------ checkpoints
def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "best.pt")


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="best.pt"):
        read_checkpoint(bad)


def test_a_checkpoint_of_another_model_config_names_the_differing_keys(tmp_path):
    path = write_checkpoint(tmp_path / "best.pt")
    other = ModelConfig.model_validate({**TINY_MODEL, "convlstm": {"hidden": [8], "kernel_size": 3}})
    with pytest.raises(ConfigError, match=r"model\.convlstm\.hidden"):
        load_model(path, other)
    model = load_model(path, ModelConfig.model_validate(TINY_MODEL))
    assert not model.training


# -------------------------------------------------------------- windows checks
def test_windows_of_another_frame_size_are_a_clear_error(tmp_path):
    path = write_windows(tmp_path / "test.h5", moving_storms(2, IN + OUT, size=16))
    with pytest.raises(DataError, match=r"frames are 16x16 but the model was trained on 32x32"):
        open_windows(path, {"in_len": IN, "out_len": OUT, "height": SIZE, "width": SIZE})


def test_windows_shorter_than_the_model_needs_are_a_clear_error(tmp_path):
    path = write_windows(tmp_path / "test.h5", moving_storms(2, IN + OUT))
    with pytest.raises(DataError, match=r"hold 4 input \+ 3 target frames but the model needs 4 \+ 6"):
        open_windows(path, {"in_len": IN, "out_len": 6, "height": SIZE, "width": SIZE})


def test_an_empty_split_is_a_clear_error(tmp_path):
    path = write_windows(tmp_path / "test.h5", np.zeros((0, IN + OUT, SIZE, SIZE), np.uint8))
    with pytest.raises(DataError, match="the test split holds no windows"):
        open_windows(path, {"in_len": IN, "out_len": OUT, "height": SIZE, "width": SIZE})


# ------------------------------------------------------------------- the stage
def _stage_files(root: Path, evaluate: dict | None = None) -> Path:
    """Windows, a tiny ConvLSTM checkpoint and a params file under ``root``; returns the params path."""
    import yaml

    from pipeline.preset import merge
    from tests.helpers.project import REPO

    write_windows(root / "windows" / "test.h5", moving_storms(6, IN + OUT, seed=2))
    write_windows(root / "windows" / "val.h5", moving_storms(3, IN + OUT, seed=3))
    write_checkpoint(root / "artifacts" / "phase2" / "best.pt")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = merge(params, {
        "windows": {"root": str(root / "windows"), "in_len": IN, "out_len": OUT},
        "model": TINY_MODEL,
        "train": {"checkpoint_dir": str(root / "artifacts"), "device": "cpu"},
        "evaluate": {"reports_dir": str(root / "reports"), "batch_size": 4, "n_examples": 2, "example_leads": [1, 3],
                     **(evaluate or {})},
    })  # fmt: skip
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def stage_params(tmp_path):
    return _stage_files(tmp_path)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One run of the stage on the test split, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("evaluated")
    store = tmp_path_factory.getbasetemp() / "mlflow"  # the store conftest points every test at
    store.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert _run(_stage_files(root)) == 0
        finally:
            torch.set_num_threads(threads)
    return root


def _run(params: Path, *extra: str) -> int:
    return run_stage(main, ["--params", str(params), *extra])


def test_stage_writes_scores_keyed_by_forecaster_and_a_headline_metrics_file(evaluated):
    doc = json.loads((evaluated / "reports" / "scores.json").read_text())
    assert doc["windows"] == 6
    for name in ("model", "persistence", "optical_flow"):
        block = doc[name]
        for key in ("csi_m", "hss_m", "csi_pool4_m", "csi_pool16_m", "mse", "mae", "ssim"):
            assert key in block, (name, key)
        for key in ("csi", "pod", "sucr", "far", "bias", "hss", "csi_pool4", "csi_pool16"):
            assert list(block[key]) == ["16", "74", "133", "160", "181", "219"], (name, key)
        assert "per_lead" not in block
    assert {k for k in doc if k.startswith("model_vs_")} == {"model_vs_persistence", "model_vs_optical_flow"}
    gaps = doc["model_vs_persistence"]
    assert gaps["csi_m_diff"] == pytest.approx(doc["model"]["csi_m"] - doc["persistence"]["csi_m"])
    # the DVC metrics: a few headline numbers per forecaster and the ratios, nothing per threshold
    head = json.loads((evaluated / "reports" / "metrics.json").read_text())
    assert set(head) == {"model", "persistence", "optical_flow", "model_vs_persistence", "model_vs_optical_flow"}
    for name in ("model", "persistence", "optical_flow"):
        assert set(head[name]) == {"csi_m", "hss_m", "csi_pool16_m", "mse", "ssim"}
        assert head[name]["csi_m"] == doc[name]["csi_m"]
    assert head["model_vs_persistence"] == {"csi_m_ratio": gaps["csi_m_ratio"]}


def test_stage_writes_per_lead_csvs_pngs_and_a_summary(evaluated):
    reports = evaluated / "reports"
    rows = (reports / "per_lead" / "csi_m.csv").read_text().splitlines()
    assert rows[0] == "lead_min,model,persistence,optical_flow"
    assert [r.split(",")[0] for r in rows[1:]] == ["5", "10", "15"]
    for thr in (16, 74, 133, 160, 181, 219):
        assert (reports / "per_lead" / f"csi_{thr}.csv").is_file()
    assert (reports / "per_lead" / "mse.csv").is_file()
    for png in ("lead_csi.png", "lead_csi_m.png", "lead_mse.png", "gallery.png"):
        assert (reports / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "MSE x10^-3" in (reports / "summary.md").read_text()


def test_stage_logs_a_nested_evaluate_run_and_headline_numbers_on_the_parent(evaluated):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("sevir-nowcasting")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.stage` = 'evaluate'")
    run = next(r for r in runs if r.data.params.get("evaluate.reports_dir") == str(evaluated / "reports"))
    assert {
        "model.csi_m",
        "persistence.csi_m",
        "optical_flow.csi_m",
        "model.csi.74",
        "windows",
        "model_vs_persistence.csi_m_ratio",
    } <= set(run.data.metrics)
    assert not any(k.startswith("model_vs_baselines") for k in run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "model.lead.csi_m")
    assert sorted(m.step for m in history) == [5, 10, 15]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "scores.json", "summary.md", "plots", "per_lead"} <= artifacts
    parent = mlflow.get_parent_run(run.info.run_id)
    for key in (
        "model.csi_m",
        "persistence.csi_m",
        "optical_flow.csi_m",
        "model.csi.16",
        "model.mse",
        "model.ssim",
        "model_vs_persistence.csi_m_ratio",
    ):
        assert key in parent.data.metrics, key


def test_split_val_and_max_batches_pick_what_is_scored(tmp_path):
    params = _stage_files(tmp_path, {"batch_size": 2, "max_batches": 1, "baselines": ["persistence"]})
    assert _run(params, "--split", "val") == 0
    doc = json.loads((tmp_path / "reports" / "scores.json").read_text())
    assert doc["windows"] == 2  # one batch of 2 of the 3 val windows
    assert set(doc) == {"model", "persistence", "windows", "model_vs_persistence"}


def test_stage_without_a_checkpoint_says_run_train_phase2(stage_params, tmp_path, capsys):
    (tmp_path / "artifacts" / "phase2" / "best.pt").unlink()
    assert _run(stage_params) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run train_phase2" in err[0]


def test_stage_with_a_checkpoint_of_another_model_config_names_the_keys(stage_params, tmp_path, capsys):
    write_checkpoint(tmp_path / "artifacts" / "phase2" / "best.pt", {"convlstm": {"hidden": [6], "kernel_size": 3}})
    assert _run(stage_params) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.convlstm.hidden" in err[0]


def test_stage_with_windows_of_another_frame_size_fails_in_one_line(stage_params, tmp_path, capsys):
    write_windows(tmp_path / "windows" / "test.h5", moving_storms(2, IN + OUT, size=16))
    assert _run(stage_params) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "16x16" in err[0]


def test_stage_on_an_empty_test_split_fails_in_one_line(stage_params, tmp_path, capsys):
    write_windows(tmp_path / "windows" / "test.h5", np.zeros((0, IN + OUT, SIZE, SIZE), np.uint8))
    assert _run(stage_params) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no windows" in err[0]
