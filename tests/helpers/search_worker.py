"""A study worker process for the storage tests: the real StudyRunner, storage and heartbeats,
with a quick analytic objective standing in for phase-1 training (what is tested here is how
workers share, resume and recover a study, not what a trial trains).

    python -m tests.helpers.search_worker PARAMS STORAGE OUT_JSON [--join] [--sleep S] [--fail-every K]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from pipeline import config
from pipeline.errors import PipelineError
from pipeline.tuning import study as study_mod
from pipeline.tuning.space import apply_overrides, suggest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("params", type=Path)
    ap.add_argument("storage")
    ap.add_argument("out", type=Path)
    ap.add_argument("--join", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--fail-every", type=int, default=0)
    ap.add_argument("--hang-at", type=int, default=-1, help="trial number that sleeps 120 s (to be killed)")
    args = ap.parse_args()
    cfg = config.load(args.params)
    cfg = apply_overrides(cfg, {"search.storage": args.storage}, source="test")
    journal = Path(args.storage)
    storage = study_mod.open_storage(cfg.search, journal)
    desc = study_mod.describe_storage(cfg.search.storage, journal)
    lock = study_mod.worker_lock(args.storage, journal)
    study = study_mod.create_or_load(
        cfg, storage, desc, create=not args.join, worker_seed=study_mod.worker_seed(cfg.search)
    )

    def objective(trial):
        values = suggest(trial, cfg.search.space, cfg)
        apply_overrides(cfg, values)  # the same validation a real trial config gets
        lr = values["train.phase1.lr"]
        for epoch in range(2):
            time.sleep(120 if trial.number == args.hang_at else args.sleep / 2)
            trial.report(-abs(math.log10(lr) + 3) - epoch * 0.01, epoch)
        if args.fail_every and trial.number % args.fail_every == args.fail_every - 1:
            raise PipelineError(f"trial {trial.number}: simulated non-finite loss at epoch 1")
        return -abs(math.log10(lr) + 3)

    runner = study_mod.StudyRunner(study, cfg.search, objective, lock)
    ran = runner.run()
    args.out.write_text(json.dumps({"ran": ran, "study": study.study_name}))
    print(json.dumps({"ran": ran}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
