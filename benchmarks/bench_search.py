"""Stage search: trials per hour on the default sample, and the study's overhead per trial.

    python benchmarks/bench_search.py [--params params.yaml] [--trials 4] [--threads 2] [--json out.json]

Builds the default embedded sample (fetch + chunk with ``--params``, in a temporary folder), then in
one run:

  (a) the study as the stage runs it (pipeline.tuning: journal storage, TPE, median pruner,
      heartbeats, a nested MLflow run per trial) for ``--trials`` trials of the default space, each
      a short phase-1 ``fit`` (search.epochs x search.max_steps_per_epoch): trials per hour, and per
      trial the wall time against the time inside ``fit`` (the rest is the study's share);
  (b) the same machinery with an objective that returns at once (``--empty`` trials): what the study
      itself costs per trial (storage writes, sampling, heartbeat thread, MLflow run), without training.

Ratios are taken within this run: overhead per trial / training time per trial. No asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--empty", type=int, default=20, help="trials of the empty objective for (b)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core machine)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import optuna
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline import chunk, config, fetch
    from pipeline.tuning import study as study_mod
    from pipeline.tuning.objective import Phase1Objective, TrialTracker
    from pipeline.tuning.space import apply_overrides, suggest

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    os.environ["DVC_ROOT"] = str(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    base = config.load(args.params)
    base = apply_overrides(
        base,
        {"data.root": str(work / "raw"), "windows.root": str(work / "windows"), "search.n_trials": args.trials},
        source="bench",
    )
    params = work / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(base.model_dump(mode="json"), sort_keys=False))
    t0 = time.perf_counter()
    fetch.main(["--params", str(params)])
    chunk.main(["--params", str(params), "--stats", str(work / "chunk_stats.json")])
    print(
        f"sample: fetch + chunk in {time.perf_counter() - t0:.1f} s ({base.data.synthetic.n_events} events, "
        f"{base.data.synthetic.size} px) under {work}"
    )

    client = MlflowClient()
    exp_id = client.create_experiment("bench-search")
    study_run = client.create_run(exp_id, run_name="study").info.run_id

    def run_study(name: str, objective, n: int) -> tuple[optuna.Study, float, list[float]]:
        search = apply_overrides(base, {"search.n_trials": n}, source="bench").search
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(work / f"{name}.journal"))
        )
        study = study_mod.create_or_load(base, storage, name, name=name)
        walls: list[float] = []

        def after(_study, trial) -> None:
            walls.append((trial.datetime_complete - trial.datetime_start).total_seconds())

        start = time.perf_counter()
        study_mod.StudyRunner(study, search, objective, Path(f"{work / name}.lock"), on_trial_end=after).run()
        return study, time.perf_counter() - start, walls

    # (a) real trials
    tracker = TrialTracker(client, exp_id, study_run, "real")
    study, total, walls = run_study("real", Phase1Objective(base, work / "trials", tracker), args.trials)
    train = [t.user_attrs.get("train_seconds") for t in study.trials]
    states = [t.state.name for t in study.trials]
    print(
        f"\n(a) {args.trials} trials of the default space, {base.search.epochs} epoch(s) x "
        f"{base.search.max_steps_per_epoch} steps, {args.threads} threads: {total:.1f} s"
    )
    print(f"{'trial':>5} {'state':>9} {'wall s':>8} {'fit s':>8} {'study s':>8}")
    for t, wall, fit_s in zip(study.trials, walls, train, strict=False):
        print(
            f"{t.number:>5} {t.state.name:>9} {wall:>8.2f} {fit_s if fit_s is not None else float('nan'):>8.2f} "
            f"{(wall - fit_s) if fit_s is not None else float('nan'):>8.2f}"
        )
    per_hour = 3600 * args.trials / total
    done = [(w, f) for w, f in zip(walls, train, strict=False) if f is not None]

    # (b) the machinery alone
    def empty(trial) -> float:
        values = suggest(trial, base.search.space)
        run_id = tracker.start(trial, values)
        tracker.epoch(run_id, 0, {"val.csi_m": 0.1})
        trial.report(0.1, 0)
        tracker.end(run_id, "COMPLETE", 0.1, None)
        return 0.1

    _, empty_total, empty_walls = run_study("empty", empty, args.empty)
    per_trial_overhead = empty_total / args.empty
    print(
        f"\n(b) the study machinery alone: {args.empty} trials in {empty_total:.2f} s = "
        f"{1000 * per_trial_overhead:.0f} ms per trial (median trial {1000 * statistics.median(empty_walls):.0f} ms)"
    )
    result = {
        "trials": args.trials,
        "states": states,
        "total_s": total,
        "trials_per_hour": per_hour,
        "overhead_per_trial_s": per_trial_overhead,
    }
    if done:
        fit_mean = statistics.mean(f for _, f in done)
        wall_mean = statistics.mean(w for w, _ in done)
        result.update(
            fit_mean_s=fit_mean,
            wall_mean_s=wall_mean,
            overhead_ratio=per_trial_overhead / fit_mean,
            inside_trial_share=(wall_mean - fit_mean) / wall_mean,
        )
        print(f"\ntrials per hour (2 cores, default sample): {per_hour:.0f}")
        print(f"training time per completed trial: {fit_mean:.1f} s; trial wall {wall_mean:.1f} s")
        print(
            f"study overhead per trial / training time per trial: {per_trial_overhead / fit_mean:.4f} "
            f"({1000 * per_trial_overhead:.0f} ms vs {fit_mean:.1f} s)"
        )
        print(
            f"share of a trial's wall time outside fit (config, MLflow run, heartbeat, cleanup): "
            f"{100 * (wall_mean - fit_mean) / wall_mean:.1f} %"
        )
    else:
        print(f"\nno trial completed: {states}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
