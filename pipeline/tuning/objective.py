"""One trial: a short phase-1 ``fit`` of the suggested config, each epoch reported to Optuna.

The trial's value is the best ``search.metric`` (default ``val.csi_m``) over its epochs. A
non-finite loss or running out of memory raise :class:`TrialFailed` / :class:`PipelineError`;
the study runner records them as FAIL with the reason and goes on. A trial the pruner stops is
PRUNED with the epoch and value; so is an impossible combination (the config check refuses it,
in milliseconds, before any training), with the check's message as the reason.

Each trial is an MLflow run nested under the study's run: its params (the suggested keys),
per-epoch metrics, and final state (tag ``optuna.state``; FINISHED / KILLED for pruned / FAILED).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from pipeline.config import Config
from pipeline.errors import ConfigError, PipelineError
from pipeline.tracking import flatten
from pipeline.tuning.space import apply_overrides, suggest

log = logging.getLogger("pipeline.tuning")


IMPOSSIBLE = "impossible"  # user attr of a trial whose combination the config check refused
VAL_BATCH_AUTO = 4  # windows per search.val_max_batches batch when train.batch_size is auto


class TrialFailed(PipelineError):
    """A trial that cannot finish (out of memory, a non-finite or missing score)."""


@dataclass
class TrialTracker:
    """Nested MLflow runs for trials under the study's run (explicit run ids: safe beside fit's own logging)."""

    client: Any  # mlflow.tracking.MlflowClient
    experiment_id: str
    study_run_id: str
    study_name: str

    def start(self, trial: optuna.Trial, overrides: dict[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{trial.number}",
            tags={
                "mlflow.parentRunId": self.study_run_id,
                "optuna.study": self.study_name,
                "optuna.trial": str(trial.number),
                "pipeline.stage": "search.trial",
            },
        )
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten("", overrides).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[start : start + 100])
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        return run.info.run_id

    def epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if _finite(v)]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def end(self, run_id: str, state: str, value: float | None, reason: str | None) -> None:
        with contextlib.suppress(Exception):  # bookkeeping never hides the trial's outcome
            self.client.set_tag(run_id, "optuna.state", state)
            if reason:
                self.client.set_tag(run_id, "optuna.reason", reason[:5000])
            if value is not None and _finite(value):
                self.client.log_metric(run_id, "objective", float(value))
            status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
            self.client.set_terminated(run_id, status=status)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fit(cfg: Config, out_dir: Path, callback: Any) -> Any:
    from pipeline.training import fit  # the training engine (phase 1 here); imported late: torch is heavy

    return fit(cfg, 1, out_dir, epoch_callback=callback, progress=False)


@dataclass
class Phase1Objective:
    """``objective(trial) -> float``: the study's objective over ``base`` (the params.yaml config)."""

    base: Config
    trials_dir: Path  # per-trial checkpoints, removed when the trial ends
    tracker: TrialTracker | None = None
    keep_checkpoints: bool = False

    def trial_config(self, overrides: dict[str, Any]) -> Config:
        """The trial's full config: the suggestion plus the study's short phase-1 budget, no own MLflow logging."""
        search = self.base.search
        # Every trial validates on the same windows (evenly spaced over the val split): the cap is in
        # windows, search.val_max_batches batches of the base batch size, whatever batch size a trial draws.
        base_batch = self.base.train.batch_size if isinstance(self.base.train.batch_size, int) else VAL_BATCH_AUTO
        budget = {
            "train.phase1.epochs": search.epochs,
            "train.phase1.max_steps_per_epoch": search.max_steps_per_epoch,
            "train.val_max_batches": search.val_max_batches,
            "train.val_max_windows": search.val_max_batches * base_batch,
            "tracking.enabled": False,  # the trial's MLflow run is written here, nested under the study
        }
        return apply_overrides(self.base, {**overrides, **budget}, source="search trial")

    def __call__(self, trial: optuna.Trial) -> float:
        search = self.base.search
        overrides = suggest(trial, search.space, self.base)
        run_id = self.tracker.start(trial, overrides) if self.tracker else None
        out_dir = self.trials_dir / f"trial-{trial.number:04d}"
        seen: list[float] = []
        state, reason, value = "FAIL", None, None
        try:
            try:
                cfg = self.trial_config(overrides)
                cfg = apply_overrides(cfg, {"train.checkpoint_dir": str(out_dir)}, source="search trial")
            except ConfigError as err:
                # An impossible combination: PRUNED with the reason, so TPE learns to avoid the region
                # (it ranks pruned trials below complete ones; failed trials would be drawn again).
                # It cost no training, so it does not count towards n_trials.
                trial.set_user_attr(IMPOSSIBLE, True)
                raise optuna.TrialPruned(f"impossible combination: {err}") from None

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                if self.tracker and run_id:
                    self.tracker.epoch(run_id, epoch, metrics)
                score = metrics.get(search.metric)
                if score is None:
                    keys = ", ".join(sorted(k for k in metrics if k.startswith("val"))) or "none"
                    raise TrialFailed(
                        f"search.metric = {search.metric}: not reported by validation (it reports: {keys}); fix search.metric"
                    )
                if not _finite(score):
                    raise TrialFailed(f"{search.metric} is {score} at epoch {epoch}")
                seen.append(float(score))
                trial.report(float(score), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(
                        f"pruned at epoch {epoch}: {search.metric} = {score:.4f} ({search.pruner} pruner)"
                    )

            started = time.perf_counter()
            try:
                result = _fit(cfg, out_dir, on_epoch)
            except MemoryError:
                raise TrialFailed(
                    "out of host memory; smaller model.embed_dim or train.batch_size in search.space"
                ) from None
            except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
                if "out of memory" not in str(err).lower():
                    raise
                raise TrialFailed(f"out of GPU memory ({str(err).splitlines()[0][:200]})") from None
            if (
                not seen
                and getattr(result, "best_key", None) == search.metric
                and _finite(getattr(result, "best_score", None))
            ):
                seen.append(float(result.best_score))
            if not seen:
                raise TrialFailed(f"search.metric = {search.metric}: no epoch reported it; fix search.metric")
            value = max(seen) if search.direction == "maximize" else min(seen)
            trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 3))
            trial.set_user_attr("epochs_run", len(seen))
            state = "COMPLETE"
            return value
        except optuna.TrialPruned as err:
            state, reason = "PRUNED", str(err)
            raise
        except PipelineError as err:
            reason = f"{type(err).__name__}: {err}"
            raise
        except BaseException as err:
            reason = f"{type(err).__name__}: {err}"
            raise
        finally:
            if self.tracker and run_id:
                self.tracker.end(run_id, state, value, reason)
            if not self.keep_checkpoints:
                shutil.rmtree(out_dir, ignore_errors=True)
            log.info(
                "trial %d: %s%s",
                trial.number,
                state.lower(),
                f" {search.metric} = {value:.4f}" if value is not None else f" ({reason})",
            )
