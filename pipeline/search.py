"""Stage search: the Optuna phase-1 study -> reports/search/ (best params, trials, plots).

    python -m pipeline.search [--params params.yaml]            # the stage: create/resume the study, work it, report
    python -m pipeline.search --worker [--storage URL] [--study NAME]   # an extra worker on an existing study

Each trial is a short phase-1 run (search.epochs, search.max_steps_per_epoch) of a config drawn
from search.space, scored by search.metric on the validation split; see :mod:`pipeline.tuning`.
A killed run resumes where it stopped (same command); several workers share one study (journal
file on one machine, PostgreSQL across machines). The stage prints, and writes to
best_params.yaml, the exact ``dvc exp run -S ...`` line that applies the best params.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow.exceptions import MlflowException

from pipeline import config as config_mod
from pipeline.cli import run_stage, setup_logging, stage_parser
from pipeline.errors import PipelineError
from pipeline.outputs import OutputSet, check_writable, writing
from pipeline.tracking import flatten, stage_run
from pipeline.tuning import study as study_mod
from pipeline.tuning.objective import Phase1Objective, TrialTracker
from pipeline.tuning.report import write_reports
from pipeline.tuning.space import apply_overrides

log = logging.getLogger("pipeline.search")

REPORTS = Path("reports/search")
WORKDIR = Path("artifacts/search")  # the journal and per-trial scratch checkpoints (DVC persist out)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="join an existing study as an extra worker (no reports)")
    parser.add_argument("--storage", help="override search.storage (an RDB URL or a journal path)")
    parser.add_argument("--study", help="study name to join (default: derived from params, as the stage prints it)")
    parser.add_argument("--n-trials", type=int, help="override search.n_trials (the study's total)")
    parser.add_argument("--out", type=Path, default=REPORTS, help=f"reports folder (default: {REPORTS})")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = config_mod.load(args.params)
    overrides = {}
    if args.storage:
        overrides["search.storage"] = args.storage
    if args.n_trials:
        overrides["search.n_trials"] = args.n_trials
    if overrides:
        cfg = apply_overrides(cfg, overrides, source="command line")

    reports = None
    if not args.worker:  # the report folder is checked (and a killed run's report set finished) before any trial
        reports = OutputSet(args.out.parent, [args.out.name], args.out.name, "--out")
        with writing(args.out.parent, "--out"):
            reports.recover()
        check_writable(args.out.parent, "--out")
    workdir = Path.cwd() / WORKDIR  # the stage's own outputs: in the workspace DVC runs it in (a queued
    # experiment runs in a temporary copy; DVC_ROOT, which tracking uses, points at the parent repo)
    journal = workdir / study_mod.DEFAULT_JOURNAL.name
    storage = study_mod.open_storage(cfg.search, journal)
    desc = study_mod.describe_storage(cfg.search.storage, journal)
    lock = study_mod.worker_lock(cfg.search.storage, journal)
    name = args.study or study_mod.study_name(cfg)

    if args.worker:
        with writing(desc, "search.storage"):  # a journal on a full disk: one line naming the storage
            study = study_mod.create_or_load(
                cfg, storage, desc, name=name, create=False, worker_seed=study_mod.worker_seed(cfg.search)
            )
        tracker = _tracker_for_worker(cfg, study)
        with study_mod.quiet_optuna(), writing(desc, "search.storage"):
            ran = study_mod.StudyRunner(
                study, cfg.search, Phase1Objective(cfg, workdir / "trials", tracker), lock
            ).run()
        log.info("worker %s ran trials %s of study '%s'", study_mod.worker_id(), ran or "none", name)
        return

    with stage_run(cfg, "search", ()) as mlflow:
        mlflow.log_params({k: v for k, v in flatten("search", cfg.search).items() if not k.startswith("search.space")})
        mlflow.log_params({"search.space": ", ".join(p.key for p in cfg.search.space)[:6000], "search.study": name})
        with writing(desc, "search.storage"):  # a journal on a full disk: one line naming the storage
            study = study_mod.create_or_load(cfg, storage, desc, name=name, create=True)
            run = mlflow.active_run()
            tracker = None
            if run is not None:
                from mlflow.tracking import MlflowClient

                study.set_user_attr("mlflow_run_id", run.info.run_id)
                study.set_user_attr("mlflow_experiment_id", run.info.experiment_id)
                tracker = TrialTracker(MlflowClient(), run.info.experiment_id, run.info.run_id, name)
        log.info(
            "study '%s' in %s: %d trials stored, running to %d", name, desc, len(study.trials), cfg.search.n_trials
        )
        log.info(
            "extra workers: python -m pipeline.search --worker%s",
            f" --storage '{cfg.search.storage}'" if cfg.search.storage else "",
        )
        with study_mod.quiet_optuna(), writing(desc, "search.storage"):
            study_mod.StudyRunner(study, cfg.search, Phase1Objective(cfg, workdir / "trials", tracker), lock).run()
        out = args.out
        with reports as staged:  # the whole folder replaced at once: the previous reports or these, never a mix
            info = write_reports(study, cfg.search.space, staged / out.name, _portable(desc), cfg.search.metric)
        mlflow.log_metrics({f"trials.{k}": float(v) for k, v in info["trials"].items()})
        if info["best_value"] is not None:
            mlflow.log_metrics({"best_value": info["best_value"], "best_trial": float(info["best_trial"])})
            mlflow.log_params({f"best.{k}": str(v) for k, v in info["params"].items()})
            mlflow.set_tag("search.command", info["command"])
            try:
                mlflow.log_artifacts(str(out), artifact_path="search")
            except (OSError, MlflowException) as err:  # the reports are on disk: a warning
                log.warning("MLflow: could not log the reports in %s (%s)", out,
                            (str(err).strip().splitlines() or [type(err).__name__])[0][:160])  # fmt: skip
            print(f"best {cfg.search.metric} = {info['best_value']:.4f} (trial {info['best_trial']}); apply it with:")
            print(f"  {info['command']}")
        else:
            raise PipelineError(
                f"search: no trial of study '{name}' completed ({info['trials']}); the reasons are in {out / 'trials.csv'}"
            )


def _portable(desc: str) -> str:
    """The storage as the committed report names it: a journal under the working directory relative to it, so
    the file is the same in every clone (an RDB URL is already redacted)."""
    path = Path(desc)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return path.relative_to(Path.cwd()).as_posix()
    return desc


def _tracker_for_worker(cfg: config_mod.Config, study) -> TrialTracker | None:
    """An extra worker nests its trials under the study's MLflow run (read from the study)."""
    run_id = study.user_attrs.get("mlflow_run_id")
    exp_id = study.user_attrs.get("mlflow_experiment_id")
    if not cfg.tracking.enabled or not run_id or not exp_id:
        return None
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import check_store_url, tracking_uri, with_busy_timeout

    uri = tracking_uri(cfg.tracking.uri)
    check_store_url(uri, "tracking.uri")
    return TrialTracker(MlflowClient(with_busy_timeout(uri)), exp_id, run_id, study.study_name)


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
