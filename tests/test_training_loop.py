"""The training loop's epoch: a representative capped validation, the lr schedule's end and the lr
it logs, gradient accumulation's last group, DDP-averaged epoch metrics, per-step loss curves."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.training import distributed, fit
from pipeline.training.data import SpreadSampler, spread_indices
from pipeline.training.loop import SafeTracker, Trainer
from pipeline.training.optim import lr_multiplier
from pipeline.training.report import write_reports

TINY_MODEL = {"embed_dim": 8, "patch_size": 4, "window_size": 2, "depths_down": [1, 1], "depths_up": [1, 1],
              "heads": [2, 2], "drop_path": 0.0, "convlstm": {"hidden": [8]}}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """Tiny models: one intra-op thread is as fast and immune to a busy machine."""


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """A tiny SEVIR-format sample chunked into windows (64x64, windows 4 -> 4); its val split is
    rewritten so that the first half of its windows is dry (VIL 0) and the second half wet."""
    from pipeline.sevir.synthetic import generate
    from pipeline.sevir.windows import write_windows

    root = tmp_path_factory.mktemp("sample")
    cfg = config.from_dict(_raw(root))
    generate(cfg.data.root, cfg.data.synthetic, seed=0, progress=False)
    write_windows(cfg.data.root, cfg.windows, cfg.data.split, stats_path=root / "stats.json")
    with h5py.File(root / "windows" / "val.h5", "r+") as h5:
        events = h5["window_event"][()]
        vil = h5["vil"]
        half = len(events) // 2
        wet = set(events[half:].tolist())
        for e in range(vil.shape[0]):
            vil[e] = 200 if e in wet else 0
    return root


def _raw(root: Path, train: dict | None = None, phase1: dict | None = None, tracking: bool = False) -> dict:
    return {
        "data": {"root": str(root / "raw"), "synthetic": {"n_events": 16, "size": 64, "frames": 25, "events_per_file": 8}},
        "windows": {"in_len": 4, "out_len": 4, "stride": 4, "root": str(root / "windows")},
        "model": {"name": "convlstm", **TINY_MODEL},
        "train": {"device": "cpu", "batch_size": 2, "threads": 1, "log_every": 2,
                  "phase1": {"epochs": 1, "max_steps_per_epoch": 2, **(phase1 or {})}, **(train or {})},
        "tracking": {"enabled": tracking},
    }  # fmt: skip


def _cfg(sample: Path, out: Path, phase1: dict | None = None, **train) -> config.Config:
    return config.from_dict(_raw(sample, {"checkpoint_dir": str(out), **train}, phase1))


def _val_targets(trainer: Trainer) -> list[torch.Tensor]:
    """The targets the trainer's validation actually scores, batch by batch."""
    seen: list[torch.Tensor] = []
    forward = trainer._forward_loss

    def spy(model, batch, step_phase):
        seen.append(batch["targets"].detach().clone())
        return forward(model, batch, step_phase)

    trainer._forward_loss = spy
    try:
        trainer._validate()
    finally:
        trainer._forward_loss = forward
    return seen


# ----------------------------------------------------------------------------- validation
def test_spread_indices_are_evenly_spaced_over_the_whole_range():
    assert spread_indices(160, 16) == list(range(5, 160, 10))
    assert spread_indices(10, 0) == list(range(10)) and spread_indices(10, 12) == list(range(10))
    picked = spread_indices(63, 8)
    assert len(set(picked)) == 8 and picked[0] < 63 / 8 and picked[-1] >= 63 - 63 / 8
    sampler = SpreadSampler(160, 16)
    assert list(sampler) == list(sampler) and len(sampler) == 16
    assert sampler.describe() == "validation: 16 of 160 windows (10%), evenly spaced over the split"


def test_capped_validation_is_representative_of_a_dry_then_wet_split_and_the_same_every_epoch(sample, tmp_path):
    from pipeline.sevir.dataset import WindowDataset

    val = WindowDataset(sample / "windows" / "val.h5", 4, 4)
    split_mean = float(torch.stack([val[i]["targets"] for i in range(len(val))]).mean())
    first = float(val[0]["targets"].mean())
    assert first == 0.0 and split_mean > 0.3  # the file's first windows are dry, its mean is not
    cfg = _cfg(sample, tmp_path, val_max_batches=2)  # 2 batches of 2: 4 windows
    trainer = Trainer(cfg, 1, tmp_path / "phase1", progress=False)
    try:
        epoch1 = _val_targets(trainer)
        trainer.epoch += 1
        epoch2 = _val_targets(trainer)
    finally:
        trainer.close()
    assert sum(t.shape[0] for t in epoch1) == 4
    capped_mean = float(torch.cat(epoch1).mean())
    assert abs(capped_mean - split_mean) < 0.25 * split_mean, (capped_mean, split_mean)
    assert len(epoch1) == len(epoch2) and all(torch.equal(a, b) for a, b in zip(epoch1, epoch2, strict=True))
    share = round(100 * 4 / len(val))
    assert trainer.val_description == f"validation: 4 of {len(val)} windows ({share}%), evenly spaced over the split"


def test_search_trials_validate_on_the_same_windows_whatever_their_batch_size(sample, tmp_path):
    from pipeline.tuning.objective import Phase1Objective

    base = config.from_dict({**_raw(sample, {"checkpoint_dir": str(tmp_path)}), "search": {"val_max_batches": 2}})
    objective = Phase1Objective(base=base, trials_dir=tmp_path / "trials")
    caps = {bs: objective.trial_config({"train.batch_size": bs}).train for bs in (2, 4, 8)}
    assert {t.val_max_windows for t in caps.values()} == {4}
    with pytest.raises(config.ConfigError, match=r"train\.val_max_windows"):
        config.from_dict(_raw(sample, {"val_max_windows": -1}))


# ----------------------------------------------------------------------------- lr schedule
@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "cosine_restarts", "constant"])
@pytest.mark.parametrize("warmup", [0.0, 0.1])
@pytest.mark.parametrize("total", [7, 40, 100])
def test_every_schedule_ends_at_its_floor_on_the_last_optimiser_step(schedule, warmup, total):
    cfg = config.PhaseConfig(schedule=schedule, warmup_frac=warmup, min_lr_frac=0.05, restart_epochs=1, restart_mult=2)
    f = lr_multiplier(cfg, total, 10)
    floor = {"cosine": 0.05, "cosine_restarts": 0.05, "onecycle": 1 / 25 / 1e4, "constant": 1.0}[schedule]
    assert f(total - 1) == pytest.approx(floor, rel=1e-9, abs=1e-12)
    warm = int(round(warmup * total))
    assert all(f(s) >= floor - 1e-12 for s in range(warm, total))  # never below the floor after the warm-up


def test_logged_lr_is_the_lr_the_epochs_last_step_used(sample, tmp_path, caplog):
    phase1 = {"epochs": 2, "max_steps_per_epoch": 3, "lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.0,
              "min_lr_frac": 0.1}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        result = fit(_cfg(sample, tmp_path, phase1, val_max_batches=1), 1, tmp_path / "phase1", progress=False)
    assert "validation: 2 of " in caplog.text and "evenly spaced over the split" in caplog.text
    f = lr_multiplier(config.PhaseConfig(**phase1), 6, 3)
    assert [row["lr"] for row in result.history] == pytest.approx([1e-3 * f(2), 1e-3 * f(5)])
    assert result.history[-1]["lr"] == pytest.approx(1e-4)  # the floor, on the last step


# ----------------------------------------------------------------------------- accumulation
def test_the_last_short_accumulation_group_is_divided_by_its_own_size(sample, tmp_path):
    cfg = _cfg(sample, tmp_path, {"epochs": 1, "max_steps_per_epoch": 5, "grad_accum": 4})  # groups of 4 and 1
    trainer = Trainer(cfg, 1, tmp_path / "phase1", progress=False)
    losses, scaled = [], []
    forward, scale = trainer._forward_loss, trainer.scaler.scale

    def spy_forward(model, batch, step_phase):
        out = forward(model, batch, step_phase)
        losses.append(float(out[0].detach()))
        return out

    def spy_scale(t):
        scaled.append(float(t.detach()))
        return scale(t)

    trainer._forward_loss, trainer.scaler.scale = spy_forward, spy_scale
    try:
        trainer._train_epoch(SafeTracker(None))
    finally:
        trainer.close()
    assert len(losses) == len(scaled) == 5
    divisors = [round(loss / s) for loss, s in zip(losses, scaled, strict=True)]
    assert divisors == [4, 4, 4, 4, 1]


# ----------------------------------------------------------------------------- DDP
def _reduce_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        info = distributed.DistInfo(rank, 2, rank)
        t = torch.tensor([1.0 + rank, 10.0 * (rank + 1)])
        mean = distributed.all_reduce_mean(t, info)
        assert torch.equal(t, torch.tensor([1.0 + rank, 10.0 * (rank + 1)]))  # the input is left alone
        torch.save(mean, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_reduce_mean_averages_over_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_reduce_worker, args=(str(tmp_path / "store"), str(tmp_path / "mean")), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"mean.{rank}", weights_only=True), torch.tensor([1.5, 15.0]))
    one = torch.tensor([3.0])
    assert distributed.all_reduce_mean(one, distributed.DistInfo()) is one


def test_epoch_training_metrics_are_the_ranks_mean(sample, tmp_path, monkeypatch):
    """The epoch's loss sums go through the cross-rank mean (here a stand-in that doubles them)."""
    calls = []

    def doubled(t, info):
        calls.append(t.clone())
        return t * 2

    cfg = _cfg(sample, tmp_path, {"epochs": 1, "max_steps_per_epoch": 2})
    trainer = Trainer(cfg, 1, tmp_path / "phase1", progress=False)
    monkeypatch.setattr(distributed, "all_reduce_mean", doubled)
    try:
        metrics = trainer._train_epoch(SafeTracker(None))
    finally:
        trainer.close()
    assert len(calls) == 1
    local = (calls[0] / 2).tolist()  # 2 steps
    assert metrics["train.loss"] == pytest.approx(2 * local[0])
    assert metrics["train.mse"] == pytest.approx(2 * local[-1])


# ----------------------------------------------------------------------------- per-step curves
def test_every_log_every_step_logs_loss_and_lr_to_mlflow_and_the_report(sample, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("per-step-curves")
    cfg = _cfg(sample, tmp_path, {"epochs": 2, "max_steps_per_epoch": 3}, log_every=1)
    with mlflow.start_run(run_name="parent") as parent:
        pass
    result = fit(cfg, 1, tmp_path / "phase1", mlflow_parent=parent.info.run_id, progress=False)
    client = MlflowClient()
    run = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )[0]
    loss = sorted(client.get_metric_history(run.info.run_id, "train_step.loss"), key=lambda m: m.step)
    lr = sorted(client.get_metric_history(run.info.run_id, "train_step.lr"), key=lambda m: m.step)
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6] == [m.step for m in lr]
    assert all(math_finite(m.value) for m in loss)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val.loss")] == [1, 2]  # per epoch, as before
    # the epoch's train.loss is the mean of its per-step points (log_every 1: one step each)
    for epoch, row in enumerate(result.history, start=1):
        points = [p["train.loss"] for p in result.steps if p["epoch"] == epoch]
        assert row["train.loss"] == pytest.approx(sum(points) / len(points), rel=1e-5)
    paths = write_reports(result, 1, tmp_path / "reports")
    rows = paths["steps"].read_text().splitlines()
    assert rows[0] == "step,epoch,train_loss,lr" and [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert len(paths["curve"].read_text().splitlines()) == 3  # the per-epoch curve is unchanged


def test_a_resumed_run_keeps_the_per_step_curve_of_its_earlier_epochs(sample, tmp_path):
    out = tmp_path / "phase1"
    fit(_cfg(sample, tmp_path, {"epochs": 1, "max_steps_per_epoch": 2}, log_every=1), 1, out, progress=False)
    again = _cfg(sample, tmp_path, {"epochs": 1, "max_steps_per_epoch": 2}, log_every=1)
    result = fit(again, 1, out, progress=False)  # finished: trains nothing, the curve comes from last.pt
    assert result.resumed_from_epoch == 1 and [p["step"] for p in result.steps] == [1.0, 2.0]
    shutil.rmtree(out)


def test_loss_png_has_a_title_axis_labels_and_a_legend(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.training import report

    made = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: made.append(fig))
    history = [{"epoch": 1.0, "train.loss": 0.5, "val.loss": 0.6}, {"epoch": 2.0, "train.loss": 0.4, "val.loss": 0.5}]
    steps = [{"step": float(s), "epoch": float(1 + (s > 3)), "train.loss": 1.0 / s, "lr": 1e-3} for s in range(1, 7)]
    report._loss_png(history, steps, 1)
    (fig,) = made
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() == "global step" and ax.get_ylabel() == "loss"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["train", "validation (per epoch)"]
    train_line, val_line = ax.get_lines()
    assert list(train_line.get_xdata()) == [1, 2, 3, 4, 5, 6] and list(val_line.get_xdata()) == [3, 6]
    real_close(fig)


def math_finite(x: float) -> bool:
    return bool(np.isfinite(x))
