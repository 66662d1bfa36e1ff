"""What the study leaves for people and DVC: best params, the trial table, plots, the exp-run line.

Files (all written under a temporary name, then renamed):

- ``best_params.yaml``  study, storage, metric, best value and trial, best params (params.yaml keys)
  and ``command``: the exact ``dvc exp run -S ...`` line that applies them
- ``trials.csv``        one row per trial: number, state, value, duration, reason, params (DVC plot)
- ``history.png``       optimisation history: value per trial (pruned ones at their last reported
                        epoch), best so far, integer trial numbers
- ``importances.png``   parameter importances (fANOVA), drawn once :data:`MIN_IMPORTANCE_TRIALS`
                        trials completed; the title says from how many
- ``parallel.png``      parallel coordinates of every trial with a value: completed ones coloured by
                        value (viridis: no near-white lines), pruned ones dashed grey
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from pipeline.config import SearchParam
from pipeline.tuning.space import FIXED_ATTR, decode, exp_run_command

log = logging.getLogger("pipeline.tuning")

MIN_IMPORTANCE_TRIALS = 5  # fANOVA importances from fewer completed trials are noise


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return study.best_trial if done else None


def summary(study: optuna.Study, space: Sequence[SearchParam], storage_desc: str, metric: str) -> dict[str, Any]:
    """The content of best_params.yaml."""
    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    best = best_trial(study)
    out: dict[str, Any] = {
        "study": study.study_name,
        "storage": storage_desc,
        "metric": metric,
        "direction": study.direction.name.lower(),
        "trials": {k: v for k, v in states.items() if v},
        "best_value": None,
        "best_trial": None,
        "params": {},
        "command": None,
    }
    if best is not None:
        params = decode(best.params, space, best.user_attrs.get(FIXED_ATTR))
        out.update(
            best_value=float(best.value),
            best_trial=best.number,
            params=params,
            command=exp_run_command(params, name=f"{study.study_name}-best"),
        )
    return out


def trials_table(study: optuna.Study, space: Sequence[SearchParam]) -> str:
    keys = [p.key for p in space]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["number", "state", "value", "duration_s", "epochs", "reason", *keys])
    for t in study.get_trials(deepcopy=False):
        params = decode(t.params, space, t.user_attrs.get(FIXED_ATTR))
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
        )
        writer.writerow(
            [
                t.number,
                t.state.name,
                "" if t.value is None else f"{t.value:.6g}",
                f"{duration:.2f}" if duration != "" else "",
                len(t.intermediate_values),
                str(t.user_attrs.get("fail_reason", "")).replace("\n", " ")[:300],
                *[params.get(k, "") for k in keys],
            ]
        )
    return buf.getvalue()


def _save(fig_or_ax: Any, path: Path, title: str, size: tuple[float, float] = (12, 6)) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    if isinstance(fig_or_ax, Figure):
        fig = fig_or_ax
    elif hasattr(fig_or_ax, "flat"):  # an array of axes
        fig = fig_or_ax.flat[0].figure
    else:
        fig = fig_or_ax.figure
    fig.suptitle(title, fontsize=10)
    fig.set_size_inches(*size)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def _placeholder(path: Path, title: str, message: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, wrap=True)
    _save(fig, path, title)


def _value(t: optuna.trial.FrozenTrial) -> float | None:
    """A trial's value: the objective when complete, the last reported epoch when pruned."""
    if t.state == TrialState.COMPLETE:
        return t.value
    if t.state == TrialState.PRUNED and t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def _history(study: optuna.Study, metric: str) -> Any:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots()
    trials = [t for t in study.get_trials(deepcopy=False) if _value(t) is not None]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    ax.scatter([t.number for t in done], [t.value for t in done], color="#1f77b4", zorder=3, label="completed")
    if pruned:
        ax.scatter([t.number for t in pruned], [_value(t) for t in pruned], marker="x", color="0.45", zorder=3,
                   label="pruned (last epoch reported)")  # fmt: skip
    if done:
        better = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
        xs, best, ys = [], None, []
        for t in sorted(done, key=lambda t: t.number):
            best = t.value if best is None else better(best, t.value)
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="#d62728", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _importances(study: optuna.Study, n_done: int) -> Any:
    import matplotlib.pyplot as plt

    values = optuna.importance.get_param_importances(study)
    fig, ax = plt.subplots()
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="#1f77b4")
    ax.set_xlabel(f"importance (fANOVA, share of the objective's variance) from {n_done} completed trials")
    ax.set_ylabel("params.yaml key")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _axis(values: list[Any], log_scale: bool) -> tuple[list[float], list[float], list[str]]:
    """Positions 0-1 of ``values`` on one parallel axis, with tick positions and labels."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        xs = [float(np.log10(v)) if log_scale else float(v) for v in values]
        lo, hi = min(xs), max(xs)
        span = hi - lo or 1.0
        ticks = [lo, (lo + hi) / 2, hi] if hi > lo else [lo]
        labels = [f"{10**t if log_scale else t:.3g}" for t in ticks]
        return [(x - lo) / span for x in xs], [(t - lo) / span for t in ticks], labels
    cats = sorted({str(v) for v in values})
    pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    return [pos[str(v)] for v in values], list(pos.values()), cats


def _parallel(study: optuna.Study, space: Sequence[SearchParam], metric: str) -> Any:
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    trials = [t for t in study.get_trials(deepcopy=False) if _value(t) is not None]
    rows = [decode(t.params, space, t.user_attrs.get(FIXED_ATTR)) for t in trials]
    keys = [p.key for p in space if len({str(r.get(p.key)) for r in rows if p.key in r}) > 1]
    columns = [*keys, metric]
    logs = {p.key for p in space if p.type == "logfloat"}
    fig, ax = plt.subplots()
    done = [i for i, t in enumerate(trials) if t.state == TrialState.COMPLETE]
    values = [_value(t) for t in trials]
    cmap = colormaps["viridis"]
    norm = Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1e-9)
    positions = []
    for c, key in enumerate(columns):
        present = [i for i, r in enumerate(rows) if key == metric or key in r]
        col = [values[i] if key == metric else rows[i][key] for i in present]
        ys, ticks, labels = _axis(col, key in logs)
        positions.append(dict(zip(present, ys, strict=True)))
        ax.axvline(c, color="0.3", lw=0.8)
        for y, label in zip(ticks, labels, strict=True):
            ax.text(c + 0.04, y, label[:12], fontsize=7, va="center", color="0.15",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5})  # fmt: skip
    for i in range(len(trials)):
        xs = [c for c in range(len(columns)) if i in positions[c]]
        ys = [positions[c][i] for c in xs]
        if i in done:
            ax.plot(xs, ys, color=cmap(norm(values[i])), lw=1.6, alpha=0.9, zorder=3)
        else:
            ax.plot(xs, ys, color="0.55", lw=1.0, ls="--", alpha=0.8, zorder=2)
    ax.set_xticks(range(len(columns)), columns, fontsize=8, rotation=30, ha="right")
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(columns) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
    bar.set_label(f"{metric} (completed trials; pruned: dashed grey)")
    return fig


def plots(study: optuna.Study, out_dir: Path, metric: str, space: Sequence[SearchParam] = ()) -> list[Path]:
    """history.png, importances.png, parallel.png (a readable placeholder when a plot needs more trials)."""
    import matplotlib

    matplotlib.use("Agg")

    trials = study.get_trials(deepcopy=False)
    n_done = sum(t.state == TrialState.COMPLETE for t in trials)
    n_valued = sum(_value(t) is not None for t in trials)
    specs = [
        ("history.png", f"optimisation history ({len(trials)} trials)", lambda: _history(study, metric), n_valued, 1),
        ("importances.png", f"parameter importances from {n_done} completed trials",
         lambda: _importances(study, n_done), n_done, MIN_IMPORTANCE_TRIALS),
        ("parallel.png", f"parallel coordinates ({n_valued} trials with a value)",
         lambda: _parallel(study, space, metric), n_valued, 2),
    ]  # fmt: skip
    width = max(12.0, 1.0 * (len(space) + 2))  # about an inch per axis of the parallel plot
    paths = []
    for name, title, make, have, need in specs:
        path = out_dir / name
        if have < need:
            what = "completed trials" if name == "importances.png" else "trials with a value"
            _placeholder(path, f"{study.study_name}: {name[:-4]}",
                         f"needs {need}+ {what} (has {have}); run more with search.n_trials")  # fmt: skip
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    size = (width, 6.5) if name == "parallel.png" else (12, 6)
                    _save(make(), path, f"{study.study_name}: {title}", size)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. importances with one distinct value
                _placeholder(path, f"{study.study_name}: {name[:-4]}", f"not available: {err}")
        paths.append(path)
    return paths


def write_reports(
    study: optuna.Study, space: Sequence[SearchParam], out_dir: Path, storage_desc: str, metric: str
) -> dict[str, Any]:
    """Write every report file; returns the summary (what best_params.yaml holds)."""
    info = summary(study, space, storage_desc, metric)
    header = (
        "# Best phase-1 params of the Optuna study (stage search). Apply them with `command`,\n"
        "# then compare with `dvc exp show` / the MLflow UI.\n"
    )
    _atomic_write(out_dir / "best_params.yaml", (header + yaml.safe_dump(info, sort_keys=False, width=1000)).encode())
    _atomic_write(out_dir / "trials.csv", trials_table(study, space).encode())
    plots(study, out_dir, metric, space)
    return info
