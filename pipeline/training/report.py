"""Per-phase training reports for DVC: metrics JSON, per-epoch curve CSV (DVC plots), loss-curve PNG.

    reports/train_phase{N}.json        best key/score/epoch, epochs run, the last epoch's headline metrics
    reports/train_phase{N}_curve.csv   one row per epoch: epoch, train_loss, val_loss, lr, ...
    reports/train_phase{N}_loss.png    train and validation loss against epoch

Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

CURVE_COLUMNS = ("epoch", "train.loss", "train.loss_phase1", "train.loss_align", "val.loss", "val.mse", "val.mae",
                 "val.csi_m", "lr", "samples_per_s")  # fmt: skip


SUMMARY_KEYS = ("train.loss", "val.loss", "val.mse", "val.csi_m", "lr", "samples_per_s", "gpu_mem_peak_mib")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_reports(result: Any, phase: int, reports_dir: Path, *, stage_seconds: float | None = None) -> dict[str, Path]:
    """Write the three report files of ``result`` (a :class:`FitResult`); returns their paths."""
    reports_dir = Path(reports_dir)
    history: list[dict[str, float]] = result.history
    last = history[-1] if history else {}
    summary: dict[str, Any] = {
        "best_key": result.best_key,
        "best_score": result.best_score,
        "best_epoch": result.best_epoch,
        "epochs": len(history),
        "stopped_early": result.stopped_early,
        "batch_size": result.batch_size,
        # the last epoch's headline figures (the whole curves are in the CSV and in MLflow): few
        # keys, so `dvc exp show` stays readable
        "last": {k: last[k] for k in SUMMARY_KEYS if k in last},
    }
    if stage_seconds is not None:
        summary["stage_seconds"] = stage_seconds
    paths = {
        "metrics": reports_dir / f"train_phase{phase}.json",
        "curve": reports_dir / f"train_phase{phase}_curve.csv",
        "plot": reports_dir / f"train_phase{phase}_loss.png",
    }
    _atomic_write(paths["metrics"], (json.dumps(summary, indent=2, default=float) + "\n").encode())
    columns = [c for c in CURVE_COLUMNS if any(c in row for row in history)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([c.replace(".", "_") for c in columns])  # DVC plot fields: no dots
    for row in history:
        writer.writerow([("" if c not in row else (int(row[c]) if c == "epoch" else f"{row[c]:.6g}")) for c in columns])
    _atomic_write(paths["curve"], buf.getvalue().encode())
    _atomic_write(paths["plot"], _loss_png(history, phase))
    return paths


def _loss_png(history: list[dict[str, float]], phase: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    epochs = [row["epoch"] for row in history]
    for key, label in (("train.loss_phase1", "train (phase-1 step)"), ("train.loss_align", "train (alignment step)"),
                       ("train.loss", "train"), ("val.loss", "validation")):  # fmt: skip
        if key == "train.loss" and any("train.loss_align" in r or "train.loss_phase1" in r for r in history):
            continue  # the memory model's train.loss repeats one of its two step losses
        ys = [row.get(key) for row in history]
        if any(y is not None for y in ys):
            ax.plot(epochs, ys, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"train_phase{phase}: loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
