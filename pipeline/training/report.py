"""Per-phase training reports for DVC: metrics JSON, curve CSVs (DVC plots), loss-curve PNG.

    reports/train_phase{N}.json        best key/score/epoch, epochs run, the last epoch's headline metrics
    reports/train_phase{N}_curve.csv   one row per epoch: epoch, train_loss, val_loss, lr, ...
    reports/train_phase{N}_steps.csv   one row every train.log_every steps: step, epoch, train_loss (the
                                       mean of those steps), lr (the lr they used)
    reports/train_phase{N}_loss.png    training loss against the global step, the per-epoch validation
                                       loss at each epoch's last step beside it

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


STEP_COLUMNS = ("step", "epoch", "train.loss", "train.loss_phase1", "train.loss_align", "lr")

SUMMARY_KEYS = ("train.loss", "val.loss", "val.mse", "val.csi_m", "lr", "samples_per_s", "gpu_mem_peak_mib")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_reports(result: Any, phase: int, reports_dir: Path, *, stage_seconds: float | None = None) -> dict[str, Path]:
    """Write the four report files of ``result`` (a :class:`FitResult`); returns their paths."""
    reports_dir = Path(reports_dir)
    history: list[dict[str, float]] = result.history
    steps: list[dict[str, float]] = list(getattr(result, "steps", None) or [])
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
        "steps": reports_dir / f"train_phase{phase}_steps.csv",
        "plot": reports_dir / f"train_phase{phase}_loss.png",
    }
    _atomic_write(paths["metrics"], (json.dumps(summary, indent=2, default=float) + "\n").encode())
    _atomic_write(paths["curve"], _csv(history, CURVE_COLUMNS, ints=("epoch",)))
    _atomic_write(
        paths["steps"], _csv(steps, STEP_COLUMNS, ints=("step", "epoch"), always=("step", "epoch", "train.loss", "lr"))
    )
    _atomic_write(paths["plot"], _loss_png(history, steps, phase))
    return paths


def _csv(rows: list[dict[str, float]], candidates: tuple[str, ...], ints: tuple[str, ...] = (),
         always: tuple[str, ...] = ()) -> bytes:  # fmt: skip
    """The ``candidates`` columns some row holds (``always`` ones even when none does), dots as underscores."""
    columns = [c for c in candidates if c in always or any(c in row for row in rows)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([c.replace(".", "_") for c in columns])  # DVC plot fields: no dots
    for row in rows:
        writer.writerow([("" if c not in row else (int(row[c]) if c in ints else f"{row[c]:.6g}")) for c in columns])
    return buf.getvalue().encode()


def _loss_png(history: list[dict[str, float]], steps: list[dict[str, float]], phase: int) -> bytes:
    """Training loss per logged step (a line) and validation loss per epoch (markers at the epoch's
    last step); without per-step points (an older result), both against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two_kinds = any("train.loss_align" in r or "train.loss_phase1" in r for r in (*history, *steps))
    train_keys = (("train.loss_phase1", "train (phase-1 step)"), ("train.loss_align", "train (alignment step)"),
                  ("train.loss", "train"))  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        # each epoch's validation sits at the last step of that epoch
        end_step: dict[int, float] = {}
        for point in steps:
            end_step[int(point["epoch"])] = max(end_step.get(int(point["epoch"]), 0.0), point["step"])
        xs_train, rows_train, unit = [p["step"] for p in steps], steps, "step"
        val_rows = [row for row in history if int(row["epoch"]) in end_step]
        xs_val = [end_step[int(row["epoch"])] for row in val_rows]
        title = f"train_phase{phase}: training loss per step, validation loss per epoch"
    else:
        xs_train, rows_train, unit = [row["epoch"] for row in history], history, "epoch"
        val_rows, xs_val = history, [row["epoch"] for row in history]
        title = f"train_phase{phase}: loss per epoch"
    for key, label in train_keys:
        if key == "train.loss" and two_kinds:
            continue  # the memory model's train.loss repeats one of its two step losses
        ys = [row.get(key) for row in rows_train]
        if any(y is not None for y in ys):
            ax.plot(xs_train, [float("nan") if y is None else y for y in ys], label=label, linewidth=1.2,
                    marker="o" if unit == "epoch" or len(ys) < 30 else None, markersize=3)  # fmt: skip
    ys_val = [row.get("val.loss") for row in val_rows]
    if any(y is not None for y in ys_val):
        ax.plot(xs_val, [float("nan") if y is None else y for y in ys_val], marker="o", linestyle="--",
                color="black", label="validation (per epoch)")  # fmt: skip
    ax.set_xlabel("global step" if unit == "step" else "epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
