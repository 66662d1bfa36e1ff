"""Training engine and stages train_phase1 / train_phase2, on a tiny sample made here (64x64, 4 -> 4)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import config
from pipeline.cli import run_stage
from pipeline.errors import ConfigError, DataError
from pipeline.training import NonFiniteLossError, fit, load_model, read_checkpoint
from pipeline.training.checkpoint import config_hash

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {
    "embed_dim": 8, "patch_size": 4, "window_size": 2, "depths_down": [1, 1], "depths_up": [1, 1], "heads": [2, 2],
    "drop_path": 0.0, "convlstm": {"hidden": [8]}, "memory": {"slots": 8, "dim": 8}, "dat": {"groups": 1},
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """Tiny models: one intra-op thread is as fast and immune to a busy machine."""


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """A tiny SEVIR-format sample chunked into windows: 16 events of 25 frames at 64x64, windows 4 -> 4."""
    from pipeline.sevir.synthetic import generate
    from pipeline.sevir.windows import write_windows

    root = tmp_path_factory.mktemp("sample")
    cfg = config.from_dict(_raw(root, "convlstm"))
    generate(cfg.data.root, cfg.data.synthetic, seed=0, progress=False)
    write_windows(cfg.data.root, cfg.windows, cfg.data.split, stats_path=root / "stats.json")
    return root


def _raw(root: Path, name: str, train: dict | None = None, out: Path | None = None, tracking: bool = False) -> dict:
    train = dict(train or {})
    phases = {k: train.pop(k) for k in ("phase1", "phase2") if k in train}
    return {
        "data": {"root": str(root / "raw"), "synthetic": {"n_events": 16, "size": 64, "frames": 25, "events_per_file": 8}},
        "windows": {"in_len": 4, "out_len": 4, "stride": 4, "root": str(root / "windows")},
        "model": {"name": name, **TINY_MODEL},
        "train": {
            "device": "cpu", "batch_size": 2, "threads": 1, "checkpoint_dir": str(out or root / "artifacts"), "log_every": 2,
            "phase1": {"epochs": 2, "max_steps_per_epoch": 4, **phases.get("phase1", {})},
            "phase2": {"epochs": 1, "max_steps_per_epoch": 3, **phases.get("phase2", {})},
            **train,
        },
        "tracking": {"enabled": tracking},
    }  # fmt: skip


def _cfg(sample: Path, out: Path, name: str = "convlstm", **train) -> config.Config:
    return config.from_dict(_raw(sample, name, train, out))


def _params_file(tmp_path: Path, sample: Path, name: str = "convlstm", tracking: bool = True, **train) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_raw(sample, name, train, tmp_path / "artifacts", tracking), sort_keys=False))
    return path


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------- learning
def test_loss_goes_down_on_the_sample(sample, tmp_path):
    cfg = _cfg(sample, tmp_path, phase1={"epochs": 4, "max_steps_per_epoch": 8, "lr": 3e-3, "schedule": "constant",
                                         "best_key": "val.loss"})  # fmt: skip
    result = fit(cfg, 1, tmp_path / "phase1", progress=False)
    val = [row["val.loss"] for row in result.history]
    train = [row["train.loss"] for row in result.history]
    assert val[-1] < 0.7 * val[0] and train[-1] < 0.7 * train[0]
    assert result.best_key == "val.loss" and result.best_score == min(val)
    assert result.checkpoint == tmp_path / "phase1" / "best.pt"


def test_memory_model_phase1_logs_both_step_losses_and_moves_the_bank_phase2_leaves_it_bit_identical(sample, tmp_path):
    cfg = _cfg(sample, tmp_path, "datswinlstm_memory")
    torch.manual_seed(cfg.train.seed)
    import models

    initial_bank = models.build(cfg.model).memory.bank.detach().clone()
    r1 = fit(cfg, 1, tmp_path / "phase1", progress=False)
    assert {"train.loss_phase1", "train.loss_align"} <= set(r1.history[0])
    bank1 = read_checkpoint(r1.checkpoint)["model"]["memory.bank"]
    assert not torch.equal(bank1, initial_bank)
    r2 = fit(cfg, 2, tmp_path / "phase2", init_checkpoint=r1.checkpoint, progress=False)
    state2 = read_checkpoint(r2.last_checkpoint)
    assert torch.equal(state2["model"]["memory.bank"], bank1)
    state1 = read_checkpoint(r1.checkpoint)["model"]
    moved = [k for k in state1 if k != "memory.bank" and not torch.equal(state1[k], state2["model"][k])]
    assert moved  # the rest of the model did train in phase 2
    assert "train.loss_align" not in r2.history[0]


def test_phase1_without_alignment_runs_phase1_steps_only(sample, tmp_path):
    cfg = _cfg(sample, tmp_path, "datswinlstm_memory", phase1={"epochs": 1, "max_steps_per_epoch": 2, "align": False})
    result = fit(cfg, 1, tmp_path / "phase1", progress=False)
    assert "train.loss_phase1" in result.history[0] and "train.loss_align" not in result.history[0]


# ------------------------------------------------------------------------------------ resume
def _stage(params: Path, phase: int, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.train", "--phase", str(phase), "--params", str(params),
           "--reports", str(cwd / "reports")]  # fmt: skip
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkilled_run_resumes_to_the_same_end_as_an_uninterrupted_run(sample, tmp_path):
    train = {"phase1": {"epochs": 3, "max_steps_per_epoch": 12}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _params_file(tmp_path / "a", sample, tracking=False, **train)
    killed = _params_file(tmp_path / "b", sample, tracking=False, **train)
    proc = _stage(whole, 1, tmp_path / "a")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    proc = _stage(killed, 1, tmp_path / "b")
    last = tmp_path / "b" / "artifacts" / "phase1" / "last.pt"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not last.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed after its first checkpoint"
    assert read_checkpoint(last)["epoch"] < 3
    proc = _stage(killed, 1, tmp_path / "b")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resuming phase 1" in err

    a = read_checkpoint(tmp_path / "a" / "artifacts" / "phase1" / "last.pt")
    b = read_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    assert _same_weights(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert all(
            torch.equal(a["optimizer"]["state"][k][n], b["optimizer"]["state"][k][n]) for n in ("exp_avg", "exp_avg_sq")
        )
    losses = lambda s: [(r["train.loss"], r["val.loss"]) for r in s["history"]]  # noqa: E731
    assert losses(a) == losses(b)


def test_a_checkpoint_from_other_params_is_not_resumed(sample, tmp_path, caplog):
    fit(_cfg(sample, tmp_path, phase1={"epochs": 1, "max_steps_per_epoch": 2}), 1, tmp_path / "phase1", progress=False)
    other = _cfg(sample, tmp_path, phase1={"epochs": 1, "max_steps_per_epoch": 2, "lr": 5e-4})
    with caplog.at_level(logging.WARNING, logger="pipeline.training"):
        result = fit(other, 1, tmp_path / "phase1", progress=False)
    assert result.resumed_from_epoch == 0
    assert "not resumed, starting fresh" in caplog.text
    assert read_checkpoint(tmp_path / "phase1" / "last.pt")["config_hash"] == config_hash(other, 1)


def test_a_finished_run_with_the_same_params_resumes_and_trains_nothing(sample, tmp_path):
    cfg = _cfg(sample, tmp_path, phase1={"epochs": 1, "max_steps_per_epoch": 2})
    first = fit(cfg, 1, tmp_path / "phase1", progress=False)
    before = (tmp_path / "phase1" / "last.pt").read_bytes()
    again = fit(cfg, 1, tmp_path / "phase1", progress=False)
    assert again.resumed_from_epoch == 1 and again.history == first.history
    assert (tmp_path / "phase1" / "last.pt").read_bytes() == before


def test_a_corrupt_checkpoint_is_one_clear_line(sample, tmp_path, capsys):
    params = _params_file(tmp_path, sample, tracking=False)
    last = tmp_path / "artifacts" / "phase1" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 half a zip file")
    assert (
        run_stage(__import__("pipeline.train", fromlist=["main"]).main, ["--phase", "1", "--params", str(params)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(last) in err and "corrupt" in err


def test_checkpoints_hold_the_contract_keys_and_load_with_weights_only(sample, tmp_path):
    cfg = _cfg(sample, tmp_path, phase1={"epochs": 1, "max_steps_per_epoch": 2})
    result = fit(cfg, 1, tmp_path / "phase1", progress=False)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert state["format"] == 1 and state["phase"] == 1 and state["epoch"] == 1 and state["step"] == 2
    assert state["data"] == {"in_len": 4, "out_len": 4, "height": 64, "width": 64}
    assert state["model_config"] == cfg.model.model_dump(mode="json")
    assert state["best_key"] == "val.csi_m" and state["best_epoch"] == 1
    assert {"val.loss", "val.mse", "val.csi_m", "val.csi_pool4_m", "val.csi.16", "val.ssim"} <= set(state["history"][0])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(state)
    assert sorted(p.name for p in (tmp_path / "phase1").iterdir()) == ["best.pt", "last.pt", "model_config.json"]
    model = load_model(result.checkpoint)
    assert not model.training
    with pytest.raises(ConfigError, match=r"model\.convlstm\.hidden"):
        load_model(
            result.checkpoint,
            cfg.model.model_copy(update={"convlstm": cfg.model.convlstm.model_copy(update={"hidden": [4]})}),
        )
    with pytest.raises(DataError, match="not found"):
        read_checkpoint(tmp_path / "nothing.pt")


# ------------------------------------------------------------------------------- failures
def test_non_finite_loss_stops_with_epoch_and_step_keeps_the_checkpoint_and_fails_the_mlflow_run(
    sample, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    train_mod = __import__("pipeline.train", fromlist=["main"])
    good = _params_file(tmp_path, sample, phase1={"epochs": 1, "max_steps_per_epoch": 2})
    assert run_stage(train_mod.main, ["--phase", "1", "--params", str(good), "--reports", str(tmp_path / "r")]) == 0
    last = tmp_path / "artifacts" / "phase1" / "last.pt"
    before = last.read_bytes()
    capsys.readouterr()
    bad = _params_file(tmp_path, sample, phase1={"epochs": 1, "max_steps_per_epoch": 4, "lr": 1e30, "grad_clip": 0.0,
                                                 "schedule": "constant", "warmup_frac": 0.0})  # fmt: skip
    assert run_stage(train_mod.main, ["--phase", "1", "--params", str(bad), "--reports", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: train.phase1: non-finite loss") and "epoch 1 step " in err
    assert last.read_bytes() == before
    with pytest.raises(NonFiniteLossError, match="epoch 1 step"):  # what fit() raises for its callers
        fit(config.load(bad), 1, tmp_path / "lib", progress=False)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("sevir-nowcasting").experiment_id],
                              filter_string="attributes.run_name = 'train_phase1'", order_by=["attributes.start_time DESC"])  # fmt: skip
    assert runs[0].info.status == "FAILED"


def test_epoch_callback_exception_propagates_after_the_checkpoint(sample, tmp_path):
    class Pruned(Exception):
        pass

    seen = []

    def callback(epoch, metrics):
        seen.append((epoch, metrics["val.loss"]))
        raise Pruned

    with pytest.raises(Pruned):
        fit(_cfg(sample, tmp_path), 1, tmp_path / "phase1", epoch_callback=callback, progress=False)
    assert seen and seen[0][0] == 1
    assert read_checkpoint(tmp_path / "phase1" / "last.pt")["epoch"] == 1


def test_early_stopping_stops_after_patience_epochs_without_improvement(sample, tmp_path):
    # best_mode max on a loss that falls: no epoch after the first improves it
    cfg = _cfg(sample, tmp_path, phase1={"epochs": 6, "max_steps_per_epoch": 3, "lr": 3e-3, "best_key": "val.loss", "best_mode": "max",
                                         "early_stop_patience": 2})  # fmt: skip
    result = fit(cfg, 1, tmp_path / "phase1", progress=False)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


# ------------------------------------------------------------------------------- scaling
def test_auto_batch_size_finds_the_largest_real_step_under_a_memory_limit(sample, tmp_path):
    from pipeline.sevir.dataset import WindowDataset
    from pipeline.training.batch_size import find_batch_size
    from pipeline.training.loop import Trainer

    cfg = _cfg(sample, tmp_path)
    trainer = Trainer(cfg, 1, tmp_path / "phase1", progress=False)
    ds = WindowDataset(trainer.train_path, 4, 4, raw=True)
    try_step, restore = trainer.batch_probe(ds)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    per_sample = 8 * 64 * 64 * 4  # float32 inputs + targets of one window
    limit = 11 * per_sample  # a fake device: 11 windows' worth of memory
    ran = []

    def limited(b: int) -> None:
        if b * per_sample > limit:
            raise torch.OutOfMemoryError(f"fake limit: {b} windows need {b * per_sample} bytes > {limit}")
        try_step(b)  # the real training step
        ran.append(b)

    assert find_batch_size(limited, max_batch=64, at_most=len(ds)) == 11
    assert ran == [1, 2, 4, 8, 10, 11]
    restore()
    assert _same_weights(before, trainer.model.state_dict())
    trainer.close()


@pytest.mark.slow
def test_two_process_gloo_ddp_writes_one_checkpoint_and_one_mlflow_run(sample, tmp_path):
    from mlflow.tracking import MlflowClient

    params = _params_file(tmp_path, sample, "datswinlstm_memory", nproc_per_node=2,
                          phase1={"epochs": 1, "max_steps_per_epoch": 2})  # fmt: skip
    proc = _stage(params, 1, tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "DDP: rank 0 of 2" in err
    assert sorted(p.name for p in (tmp_path / "artifacts" / "phase1").iterdir()) == [
        "best.pt",
        "last.pt",
        "model_config.json",
    ]
    state = read_checkpoint(tmp_path / "artifacts" / "phase1" / "last.pt")
    assert state["step"] == 2
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("sevir-nowcasting")
    ours = client.search_runs(
        [exp.experiment_id], filter_string=f"params.`train.config_hash` = '{state['config_hash']}'"
    )
    assert len(ours) == 1 and ours[0].data.params["train.resolved.world_size"] == "2"


# ------------------------------------------------------------------------------- tracking
def test_mlflow_holds_both_phase_runs_with_per_epoch_metrics_under_one_parent(sample, tmp_path):
    from mlflow.tracking import MlflowClient

    train_mod = __import__("pipeline.train", fromlist=["main"])
    params = _params_file(tmp_path, sample, "datswinlstm_memory", phase1={"epochs": 2, "max_steps_per_epoch": 2},
                          phase2={"epochs": 2, "max_steps_per_epoch": 2})  # fmt: skip
    reports = tmp_path / "reports"
    for phase in (1, 2):
        assert (
            run_stage(train_mod.main, ["--phase", str(phase), "--params", str(params), "--reports", str(reports)]) == 0
        )
    client = MlflowClient()
    exp = client.get_experiment_by_name("sevir-nowcasting")
    hashes = {p: read_checkpoint(tmp_path / "artifacts" / f"phase{p}" / "last.pt")["config_hash"] for p in (1, 2)}
    runs = {}
    for phase, h in hashes.items():
        found = client.search_runs([exp.experiment_id], filter_string=f"params.`train.config_hash` = '{h}'")
        assert len(found) == 1
        runs[phase] = found[0]
    assert runs[1].info.run_name == "train_phase1" and runs[2].info.run_name == "train_phase2"
    assert runs[1].data.tags["mlflow.parentRunId"] == runs[2].data.tags["mlflow.parentRunId"]
    for phase, run in runs.items():
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val.loss")] == [1, 2]
        assert "train.phase1.lr" in run.data.params and "model.name" in run.data.params
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, f"phase{phase}")}
        assert f"phase{phase}/model_config.json" in artifacts
        assert not any(a.endswith(".pt") for a in artifacts)  # checkpoints stay on disk; evaluate logs the model
        assert {d.dataset.name for d in client.get_run(run.info.run_id).inputs.dataset_inputs} == {
            "windows/train",
            "windows/val",
        }
    assert len(client.get_metric_history(runs[1].info.run_id, "train.loss_align")) == 2
    summary = json.loads((reports / "train_phase1.json").read_text())
    assert summary["epochs"] == 2 and summary["best_key"] == "val.csi_m"
    curve = (reports / "train_phase2_curve.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,train_loss") and len(curve) == 3
    assert (reports / "train_phase1_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_nests_its_own_run_under_a_given_parent(sample, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("fit-parent")
    with mlflow.start_run(run_name="trial") as parent:
        pass
    fit(_cfg(sample, tmp_path, phase1={"epochs": 1, "max_steps_per_epoch": 2}), 1, tmp_path / "p1",
        mlflow_parent=parent.info.run_id, progress=False)  # fmt: skip
    client = MlflowClient()
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 1 and children[0].info.run_name == "train_phase1"
    assert len(client.get_metric_history(children[0].info.run_id, "val.loss")) == 1


def test_a_tracker_that_fails_mid_run_is_switched_off_once(sample, tmp_path, caplog):
    class GoneAfterFirstEpoch:
        """An mlflow-like tracker whose server disappears after the first logged metrics."""

        def __init__(self):
            self.calls = 0

        def log_params(self, params):
            pass

        def log_metrics(self, metrics, step=None):
            self.calls += 1
            if self.calls > 1:
                raise ConnectionError("tracking server at http://127.0.0.1:5000 went away")

        def __getattr__(self, name):
            raise ConnectionError("tracking server went away")

    cfg = _cfg(sample, tmp_path, phase1={"epochs": 3, "max_steps_per_epoch": 2})
    with caplog.at_level(logging.WARNING, logger="pipeline.training"):
        result = fit(cfg, 1, tmp_path / "phase1", tracker=GoneAfterFirstEpoch(), progress=False)
    assert len(result.history) == 3 and read_checkpoint(result.last_checkpoint)["epoch"] == 3
    assert caplog.text.count("tracking is off") == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_tracking_server_killed_mid_run_costs_no_training(sample, tmp_path):
    import urllib.request

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        raw = _raw(
            sample, "convlstm", {"phase1": {"epochs": 3, "max_steps_per_epoch": 12}}, tmp_path / "artifacts", True
        )
        raw["tracking"]["uri"] = f"http://127.0.0.1:{port}"
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # fmt: skip
        env.pop("MLFLOW_TRACKING_URI")
        stage = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--phase", "1", "--params", str(params),
                                  "--reports", str(tmp_path / "reports")], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        last = tmp_path / "artifacts" / "phase1" / "last.pt"
        while stage.poll() is None and not last.exists():
            time.sleep(0.01)
        os.killpg(server.pid, signal.SIGKILL)  # the server (and its workers) go away after the first epoch
        server.wait()
        _, err = stage.communicate(timeout=300)
        assert stage.returncode == 0, err
        assert read_checkpoint(last)["epoch"] == 3
        assert "tracking is off for the rest of this run" in err
        assert json.loads((tmp_path / "reports" / "train_phase1.json").read_text())["epochs"] == 3
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
