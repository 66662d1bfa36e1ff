"""What evaluation writes: metrics.json (DVC metrics), scores.json, per-lead CSVs (DVC plots), PNGs, a summary.

Layout under the reports directory::

    metrics.json              the headline (DVC metrics, what `dvc exp show` compares):
                              {"model": {"csi_m", "hss_m", "csi_pool16_m", "mse", "ssim"},
                               "persistence": {...}, "optical_flow": {...},
                               "model_vs_persistence": {"csi_m_ratio"}, "model_vs_optical_flow": {...}}
    scores.json               every score (a plain report, not DVC metrics): per forecaster the
                              aggregates and per-threshold dicts (csi, pod, sucr, far, bias, hss,
                              csi_pool4, csi_pool16), "windows", and "model_vs_<baseline>" with the
                              model's differences (<key>_diff) and csi_m_ratio
    per_lead/csi_m.csv        lead_min, model, persistence, optical_flow   (one row per lead time)
    per_lead/mse.csv          the same for MSE (0-1 scale)
    per_lead/csi_<T>.csv      the same for CSI at threshold T, one file per threshold
    plots/lead_csi.png        CSI per threshold against lead time, every forecaster
    plots/lead_csi_m.png      CSI-M against lead time
    plots/lead_mse.png        MSE (x 10^-3) against lead time
    plots/gallery.png         heavy-rain test windows: inputs, truth, every forecaster
    summary.md                the headline table for people

Lead times are in minutes: lead ``j`` (1-based) is ``j x frame_minutes``, the windows file's frame
interval (:func:`pipeline.scoring.evaluation.frame_minutes`; 10 at ``windows.frame_step: 2``).
Undefined scores are ``null`` in JSON and empty cells in CSV, everywhere. Every file is written
to a temporary name and renamed, so a killed stage leaves no half-written report.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FRAME_MINUTES = 5  # SEVIR frames are 5 minutes apart: the default interval (windows.frame_step 1)
GAP_KEYS = ("csi_m", "hss_m", "csi_pool4_m", "csi_pool16_m", "mse", "mae", "ssim")
HEADLINE_KEYS = ("csi_m", "hss_m", "csi_pool16_m", "mse", "ssim")  # per forecaster in metrics.json
VS_PREFIX = "model_vs_"  # model_vs_<baseline>: the model's gaps to that baseline (one key, everywhere)

# The SEVIR VIL colour map (MIT-AI-Accelerator/neurips-2020-sevir display code): bins on the 0-255 scale.
VIL_COLORS = [
    (0.30196078431372547, 0.30196078431372547, 0.30196078431372547),
    (0.1568627450980392, 0.7450980392156863, 0.1568627450980392),
    (0.09803921568627451, 0.5882352941176471, 0.09803921568627451),
    (0.0392156862745098, 0.4117647058823529, 0.0392156862745098),
    (0.0392156862745098, 0.29411764705882354, 0.0392156862745098),
    (0.9607843137254902, 0.9607843137254902, 0.0),
    (0.9294117647058824, 0.6745098039215687, 0.0),
    (0.9411764705882353, 0.43137254901960786, 0.0),
    (0.6274509803921569, 0.0, 0.0),
    (0.9058823529411765, 0.0, 1.0),
]
VIL_LEVELS = [0, 16, 31, 59, 74, 100, 133, 160, 181, 219, 255]
FORECASTER_COLORS = {"model": "#d62728", "persistence": "#7f7f7f", "optical_flow": "#1f77b4"}
FORECASTER_LABELS = {"model": "model", "persistence": "persistence", "optical_flow": "optical flow (LK)"}


# ----------------------------------------------------------------- atomic writes
def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------- metrics.json
def metrics_block(scores: dict[str, Any]) -> dict[str, Any]:
    """A forecaster's metrics.json block: the aggregate scores, without the per-lead arrays."""
    return {key: value for key, value in scores.items() if key != "per_lead"}


def model_gaps(model: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """How far the model is above (+) or below (-) a baseline: differences, and the CSI-M ratio."""
    gaps: dict[str, float | None] = {}
    for key in GAP_KEYS:
        if key in model and key in baseline:
            a, b = model[key], baseline[key]
            gaps[f"{key}_diff"] = None if a is None or b is None else a - b
    a, b = model.get("csi_m"), baseline.get("csi_m")
    gaps["csi_m_ratio"] = None if a is None or not b else a / b
    return gaps


def metrics_document(scores: dict[str, dict[str, Any]], windows: int) -> dict[str, Any]:
    """Every score (scores.json): a block per forecaster, ``windows``, and ``model_vs_<baseline>``, the
    model's gaps to each baseline."""
    doc: dict[str, Any] = {name: metrics_block(s) for name, s in scores.items()}
    doc["windows"] = windows
    if "model" in scores:
        for name, s in scores.items():
            if name != "model":
                doc[f"{VS_PREFIX}{name}"] = model_gaps(scores["model"], s)
    return doc


def forecaster_names(doc: dict[str, Any]) -> list[str]:
    """The forecasters of a scores or headline document, in order (model first)."""
    return [k for k, v in doc.items() if isinstance(v, dict) and "csi_m" in v and not k.startswith(VS_PREFIX)]


def comparisons(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{baseline: gaps}`` from the ``model_vs_<baseline>`` blocks of a document."""
    return {k[len(VS_PREFIX) :]: v for k, v in doc.items() if k.startswith(VS_PREFIX) and isinstance(v, dict)}


def headline_document(doc: dict[str, Any]) -> dict[str, Any]:
    """metrics.json, the DVC metrics: per forecaster :data:`HEADLINE_KEYS`, and the model's CSI-M ratio to
    each baseline, so ``dvc exp show`` has a few columns to compare (the detail is in scores.json)."""
    out: dict[str, Any] = {name: {k: doc[name].get(k) for k in HEADLINE_KEYS} for name in forecaster_names(doc)}
    for base, gaps in comparisons(doc).items():
        out[f"{VS_PREFIX}{base}"] = {"csi_m_ratio": gaps.get("csi_m_ratio")}
    return out


def write_metrics(path: Path, doc: dict[str, Any]) -> None:
    """metrics.json or scores.json with ``null`` for undefined scores (NaN would be invalid JSON for DVC)."""
    write_atomic(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


# ------------------------------------------------------------------ per-lead CSV
def lead_minutes(out_len: int, frame_minutes: int = FRAME_MINUTES) -> list[int]:
    """Minutes after the forecast origin of each of ``out_len`` target frames ``frame_minutes`` apart."""
    return [frame_minutes * (i + 1) for i in range(out_len)]


def per_lead_tables(scores: dict[str, dict[str, Any]],
                    frame_minutes: int = FRAME_MINUTES) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """``{"csi_m": rows, "mse": rows, "csi_16": rows, ...}``; a row is ``{"lead_min", <forecaster>: value}``,
    ``lead_min`` the lead in minutes with frames ``frame_minutes`` apart (the windows file's)."""
    names = list(scores)
    first = scores[names[0]]["per_lead"]
    out_len = len(first["csi_m"])
    series: dict[str, dict[str, list[Any]]] = {"csi_m": {}, "mse": {}}
    for name in names:
        lead = scores[name]["per_lead"]
        series["csi_m"][name] = lead["csi_m"]
        series["mse"][name] = lead["mse"]
        for thr, values in lead["csi"].items():
            series.setdefault(f"csi_{thr}", {})[name] = values
    minutes = lead_minutes(out_len, frame_minutes)
    return {
        metric: [{"lead_min": minutes[j], **{n: by_name[n][j] for n in names}} for j in range(out_len)]
        for metric, by_name in series.items()
    }


def write_per_lead_csvs(directory: Path, tables: dict[str, list[dict[str, Any]]]) -> list[Path]:
    paths = []
    for metric, rows in tables.items():
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
        path = Path(directory) / f"{metric}.csv"
        write_atomic(path, buf.getvalue())
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    write_atomic(path, buf.getvalue())
    return path


def _series(rows: list[dict[str, Any]], name: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    return [r["lead_min"] for r in rows], [np.nan if r[name] is None else r[name] * scale for r in rows]


def _draw_lines(ax: Any, rows: list[dict[str, Any]], names: Sequence[str], scale: float = 1.0) -> None:
    for name in names:
        x, y = _series(rows, name, scale)
        ax.plot(x, y, marker="o", ms=3, lw=2 if name == "model" else 1.4, color=FORECASTER_COLORS.get(name),
                label=FORECASTER_LABELS.get(name, name))  # fmt: skip
    ax.set_xlabel("lead time (min)")
    ax.grid(alpha=0.3)
    ax.set_xlim(0, rows[-1]["lead_min"] + rows[0]["lead_min"])  # the first lead is one frame interval


def plot_per_lead(directory: Path, tables: dict[str, list[dict[str, Any]]], names: Sequence[str],
                  title: str = "") -> list[Path]:  # fmt: skip
    """lead_csi.png (a panel per threshold), lead_csi_m.png and lead_mse.png."""
    plt = _pyplot()
    directory = Path(directory)
    suffix = f" - {title}" if title else ""
    paths = []

    thresholds = [k.split("_", 1)[1] for k in tables if k.startswith("csi_") and k != "csi_m"]
    cols = min(3, len(thresholds))
    rows_n = -(-len(thresholds) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.3 * rows_n), squeeze=False, sharex=True)
    for ax, thr in zip(axes.flat, thresholds, strict=False):
        _draw_lines(ax, tables[f"csi_{thr}"], names)
        ax.set_title(f"CSI, VIL >= {thr}")
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(thresholds) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"CSI per threshold against lead time{suffix}")
    fig.tight_layout()
    paths.append(_save(fig, directory / "lead_csi.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_lines(ax, tables["csi_m"], names)
    ax.set_ylabel("CSI-M (mean over thresholds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"CSI-M against lead time{suffix}")
    ax.legend()
    paths.append(_save(fig, directory / "lead_csi_m.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_lines(ax, tables["mse"], names, scale=1e3)
    ax.set_ylabel(r"MSE $\times 10^{-3}$ (VIL on the 0-1 scale)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"MSE against lead time{suffix}")
    ax.legend()
    paths.append(_save(fig, directory / "lead_mse.png"))
    return paths


def vil_colormap() -> tuple[Any, Any]:
    """The SEVIR VIL colour map and its bin norm (0-255 scale); values below 16 are drawn dark grey."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cmap = ListedColormap(VIL_COLORS, name="sevir_vil").with_extremes(
        bad=(0.0, 0.0, 0.0), under=VIL_COLORS[0], over=VIL_COLORS[-1]
    )
    return cmap, BoundaryNorm(VIL_LEVELS, cmap.N)


def plot_gallery(path: Path, examples: dict[str, Any], leads: Sequence[int], titles: Sequence[str] = (),
                 n_inputs: int = 4, frame_minutes: int = FRAME_MINUTES) -> Path | None:  # fmt: skip
    """The forecast gallery: per window, a row of the last inputs, then truth and every forecaster at ``leads``.

    ``examples`` as returned by :func:`pipeline.scoring.evaluation.forecast_examples` (0-255 numpy).
    ``leads`` are 1-based lead indices; labels are in minutes, frames ``frame_minutes`` apart (input
    frames: minutes before the origin).
    ``titles`` name the windows (a short line or two, drawn in the label column).
    """
    if examples["inputs"] is None:
        return None
    plt = _pyplot()
    cmap, norm = vil_colormap()
    inputs, truth, forecasts = examples["inputs"], examples["truth"], examples["forecasts"]
    n_windows, t_in = inputs.shape[:2]
    out_len = truth.shape[1]
    leads = [lead for lead in leads if 1 <= lead <= out_len] or [out_len]
    n_in = min(n_inputs, t_in)
    rows = [("truth", truth)] + [(FORECASTER_LABELS.get(n, n), f) for n, f in forecasts.items()]
    n_rows = n_windows * (1 + len(rows))
    n_cols = max(n_in, len(leads))
    fig, axes = plt.subplots(n_rows, n_cols + 1, figsize=(1.55 * (n_cols + 1), 1.6 * n_rows), squeeze=False,
                             gridspec_kw={"width_ratios": [0.55] + [1] * n_cols})  # fmt: skip
    image = None
    for w in range(n_windows):
        base = w * (1 + len(rows))
        label = titles[w] if w < len(titles) else f"window {w}"
        _row_label(axes[base, 0], "inputs", y=0.35)  # below the window's name
        axes[base, 0].text(0.95, 1.0, label, ha="right", va="top", fontsize=8, fontweight="bold",
                           transform=axes[base, 0].transAxes)  # fmt: skip
        for c in range(n_cols):
            ax = axes[base, c + 1]
            ax.axis("off")
            if c < n_in:
                k = t_in - n_in + c  # frame index within the inputs
                image = ax.imshow(inputs[w, k], cmap=cmap, norm=norm, interpolation="nearest")
                ax.set_title(f"{-(t_in - 1 - k) * frame_minutes} min", fontsize=8)
        for r, (name, frames) in enumerate(rows, start=1):
            _row_label(axes[base + r, 0], name)
            for c in range(n_cols):
                ax = axes[base + r, c + 1]
                ax.axis("off")
                if c < len(leads):
                    image = ax.imshow(frames[w, leads[c] - 1], cmap=cmap, norm=norm, interpolation="nearest")
                    if r == 1:
                        ax.set_title(f"+{leads[c] * frame_minutes} min", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.88, top=0.97, bottom=0.02, wspace=0.04, hspace=0.22)
    for w in range(1, n_windows):  # a rule between windows
        top = axes[w * (1 + len(rows)) - 1, 1].get_position().y0
        below = axes[w * (1 + len(rows)), 1].get_position().y1
        y = top - 0.15 * (top - below)  # just under the block above, clear of the next titles
        fig.add_artist(plt.Line2D([0.01, 0.87], [y, y], color="0.6", lw=0.8))
    cax = fig.add_axes((0.90, 0.2, 0.018, 0.6))
    bar = fig.colorbar(image, cax=cax, extend="neither", ticks=VIL_LEVELS)
    bar.set_label("VIL (0-255 scale)")
    bar.ax.tick_params(labelsize=7)
    return _save(fig, Path(path))


def _row_label(ax: Any, text: str, y: float = 0.5) -> None:
    ax.axis("off")
    ax.text(0.95, y, text, ha="right", va="center", fontsize=8, transform=ax.transAxes)


# -------------------------------------------------------------------- summary
def _cell(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def summary_markdown(doc: dict[str, Any], split: str) -> str:
    """A table of the headline scores (MSE also as x 10^-3, as papers report it) and the model's gaps."""
    names = forecaster_names(doc)
    thresholds = list(doc[names[0]]["csi"])
    head = ["forecaster", "CSI-M", "HSS-M", "CSI-pool4-M", "CSI-pool16-M", "MSE x10^-3", "MAE", "SSIM"]
    head += [f"CSI {t}" for t in thresholds]
    lines = [f"# Evaluation on the {split} split ({doc['windows']} windows)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for n in names:
        b = doc[n]
        cells = [n, _cell(b["csi_m"]), _cell(b["hss_m"]), _cell(b.get("csi_pool4_m")), _cell(b.get("csi_pool16_m")),
                 _cell(b["mse"], 1e3), _cell(b["mae"], 1, 4), _cell(b.get("ssim"))]  # fmt: skip
        cells += [_cell(b["csi"][t]) for t in thresholds]
        lines.append("| " + " | ".join(cells) + " |")
    for base, gaps in comparisons(doc).items():
        ratio = gaps.get("csi_m_ratio")
        diff = gaps.get("csi_m_diff")
        lines += ["", f"Model vs {base}: CSI-M {_signed(diff)} ({'n/a' if ratio is None else f'{ratio:.2f}x'}), "
                      f"MSE {_signed(gaps.get('mse_diff'), 1e3)} x10^-3."]  # fmt: skip
    lines += ["", "Undefined scores (a threshold neither forecast nor truth reaches, 0/0) are n/a here, "
                  "null in metrics.json, and left out of CSI-M/HSS-M."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _signed(value: float | None, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:+.3f}"
