"""What the study leaves for people and DVC: best params, the trial table, plots, the exp-run line.

Files (all written under a temporary name, then renamed):

- ``best_params.yaml``  study, storage, metric, best value and trial, best params (params.yaml keys)
  and ``command``: the exact ``dvc exp run -S ...`` line that applies them
- ``trials.csv``        one row per trial: number, state, value, duration, reason, params (DVC plot)
- ``history.png``       optimisation history (value per trial, best so far)
- ``importances.png``   parameter importances (fANOVA) once 2+ trials completed
- ``parallel.png``      parallel coordinates of the completed trials
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

import optuna
import yaml
from optuna.trial import TrialState

from pipeline.config import SearchParam
from pipeline.tuning.space import decode, exp_run_command

log = logging.getLogger("pipeline.tuning")


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
        params = decode(best.params, space)
        out.update(best_value=float(best.value), best_trial=best.number, params=params,
                   command=exp_run_command(params, name=f"{study.study_name}-best"))
    return out


def trials_table(study: optuna.Study, space: Sequence[SearchParam]) -> str:
    keys = [p.key for p in space]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["number", "state", "value", "duration_s", "epochs", "reason", *keys])
    for t in study.get_trials(deepcopy=False):
        params = decode(t.params, space)
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
        writer.writerow([
            t.number, t.state.name, "" if t.value is None else f"{t.value:.6g}",
            f"{duration:.2f}" if duration != "" else "", len(t.intermediate_values),
            str(t.user_attrs.get("fail_reason", "")).replace("\n", " ")[:300],
            *[params.get(k, "") for k in keys],
        ])
    return buf.getvalue()


def _save(fig_or_ax: Any, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    if isinstance(fig_or_ax, Figure):
        fig = fig_or_ax
    elif hasattr(fig_or_ax, "flat"):  # an array of axes
        fig = fig_or_ax.flat[0].figure
    else:
        fig = fig_or_ax.figure
    fig.suptitle(title, fontsize=10)
    fig.set_size_inches(12, 6)
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


def _top_params(study: optuna.Study, k: int) -> list[str] | None:
    """The ``k`` most important params (fANOVA); None (all) when importances cannot be computed."""
    try:
        return list(optuna.importance.get_param_importances(study))[:k]
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None


def plots(study: optuna.Study, out_dir: Path, metric: str) -> list[Path]:
    """history.png, importances.png, parallel.png (a readable placeholder when a plot needs more trials)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    paths = []
    specs = [
        ("history.png", "optimisation history", lambda: ovm.plot_optimization_history(study, target_name=metric), 1),
        ("importances.png", "parameter importances (fANOVA)", lambda: ovm.plot_param_importances(study), 2),
        ("parallel.png", "parallel coordinates (the 6 most important params)",
         lambda: ovm.plot_parallel_coordinate(study, params=_top_params(study, 6), target_name=metric), 2),
    ]
    for name, title, make, need in specs:
        path = out_dir / name
        if len(done) < need:
            _placeholder(path, f"{study.study_name}: {title}",
                         f"needs {need}+ completed trials (has {len(done)}); run more with search.n_trials")
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # optuna's ExperimentalWarning on the matplotlib backend
                    _save(make(), path, f"{study.study_name}: {title}")
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. importances with one distinct value
                _placeholder(path, f"{study.study_name}: {title}", f"not available: {err}")
        paths.append(path)
    return paths


def write_reports(study: optuna.Study, space: Sequence[SearchParam], out_dir: Path, storage_desc: str, metric: str) -> dict[str, Any]:
    """Write every report file; returns the summary (what best_params.yaml holds)."""
    info = summary(study, space, storage_desc, metric)
    header = (
        "# Best phase-1 params of the Optuna study (stage search). Apply them with `command`,\n"
        "# then compare with `dvc exp show` / the MLflow UI.\n"
    )
    _atomic_write(out_dir / "best_params.yaml", (header + yaml.safe_dump(info, sort_keys=False, width=1000)).encode())
    _atomic_write(out_dir / "trials.csv", trials_table(study, space).encode())
    plots(study, out_dir, metric)
    return info
