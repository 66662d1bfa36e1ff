"""Stages train_phase1 / train_phase2: windows -> artifacts/phase{N}/{last,best}.pt + reports.

    python -m pipeline.train --phase 1|2 [--params params.yaml] [--reports reports]

Phase 1 (memory learning) trains from scratch; phase 2 (frozen memory) starts from the phase-1
best checkpoint. Both resume from their ``last.pt`` only when it was made from the same params,
the same training code (``models/``, ``pipeline/training/``, ``pipeline/scoring/``, this file) and
the same windows files (``train.h5``, ``val.h5``); otherwise they train from scratch and log one line saying which of
the three changed. A phase-1 checkpoint from other code or data is refused by phase 2 (rerun
train_phase1). ``train.nproc_per_node: N`` (N > 1) makes this command launch N DDP workers of
itself through ``torch.distributed.run``; under torchrun it is one of the workers. See the README
section "Training" and :mod:`pipeline.training`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pipeline import config as config_mod
from pipeline.cli import run_stage, setup_logging, stage_parser
from pipeline.errors import ConfigError, PipelineError
from pipeline.outputs import OutputError, OutputSet, check_writable, writing
from pipeline.sevir.dataset import check_windows_file
from pipeline.tracking import stage_run
from pipeline.training import distributed, fit
from pipeline.training.checkpoint import check_phase
from pipeline.training.report import write_reports

log = logging.getLogger("pipeline.train")
REPORTS = Path("reports")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--phase", type=int, choices=(1, 2), required=True, help="1: memory learning, 2: frozen memory")
    parser.add_argument("--reports", type=Path, default=REPORTS, help=f"reports folder (default: {REPORTS})")
    args = parser.parse_args(argv)
    worker = distributed.in_launched_worker(os.environ)
    rank = int(os.environ.get("RANK", "0")) if worker else 0
    setup_logging(args.verbose)
    if rank:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the job
    cfg = config_mod.load(args.params)
    nproc = cfg.train.nproc_per_node
    if nproc > 1 and not worker:
        import torch

        gpus = torch.cuda.device_count() if cfg.train.device != "cpu" else 0
        if gpus and nproc > gpus:
            raise ConfigError(f"train.nproc_per_node = {nproc} but only {gpus} GPU(s) are visible; set it to {gpus} at most "
                              "(or train.device: cpu for CPU workers)")  # fmt: skip
        forwarded = ["--phase", str(args.phase), "--params", str(args.params), "--reports", str(args.reports)]
        code = distributed.launch("pipeline.train", forwarded + (["-v"] if args.verbose else []), nproc)
        if code:
            raise PipelineError(f"train_phase{args.phase}: the {nproc} DDP workers (train.nproc_per_node) failed with "
                                f"exit code {code}; the first worker error is above")  # fmt: skip
        return

    out_dir = cfg.train.checkpoint_dir / f"phase{args.phase}"
    stage = f"train_phase{args.phase}"
    start = time.perf_counter()
    if rank:
        try:
            fit(cfg, args.phase, out_dir, env=dict(os.environ), progress=False)
        finally:
            distributed.teardown()
        return
    result = None
    # folders that cannot take files are refused now, not after an epoch of training
    check_writable(out_dir, "train.checkpoint_dir")
    check_writable(args.reports, "--reports")
    for split in ("train", "val"):  # windows made with other windows.* params are refused before any step
        path = cfg.windows.root / f"{split}.h5"
        if split == "train" or path.exists():
            check_windows_file(path, cfg.windows.frame_step, cfg.frame_size())
    if args.phase == 2:  # phase 2 starts from phase 1's best: another phase's file is refused before any step
        check_phase(cfg.train.checkpoint_dir / "phase1" / "best.pt", 1, "rerun train_phase1 (dvc repro train_phase1)")
    try:
        with stage_run(cfg, stage, ("model", "train", "windows")) as mlflow:
            try:
                with writing(out_dir, "train.checkpoint_dir"):
                    result = fit(cfg, args.phase, out_dir, tracker=mlflow, env=dict(os.environ) if worker else None)
            except OutputError:
                _drop_partial(out_dir)  # last.pt / best.pt of the epochs before are kept
                raise
            names = [
                f"{stage}_curve.csv",
                f"{stage}_steps.csv",
                f"{stage}_loss.png",
                f"{stage}.json",
            ]  # json (DVC) last
            with OutputSet(args.reports, names, stage, "--reports") as staged:  # the four replaced together
                staged_paths = write_reports(result, args.phase, staged, stage_seconds=time.perf_counter() - start)
            paths = {key: args.reports / path.name for key, path in staged_paths.items()}
            try:
                mlflow.log_artifact(str(paths["plot"]))
                mlflow.log_artifact(str(paths["metrics"]))
            except Exception as err:  # a tracking server gone: the results are on disk
                log.warning("MLflow: could not log the reports (%s)", str(err).splitlines()[0][:160])
    except PipelineError:
        raise
    except Exception as err:
        if result is None:
            raise
        # closing the MLflow run failed (tracking server gone): training and reports are done
        log.warning("MLflow: could not close the %s run (%s); checkpoints and reports are on disk", stage,
                    str(err).splitlines()[0][:160])  # fmt: skip
    finally:
        distributed.teardown()
    log.info("%s: best %s = %s at epoch %s -> %s", stage, result.best_key, result.best_score, result.best_epoch,
             result.checkpoint)  # fmt: skip


def _drop_partial(out_dir: Path) -> None:
    """Remove the temporary files this process left half-written in ``out_dir`` (a failed write)."""
    for tmp in out_dir.glob(f".*.{os.getpid()}.tmp"):
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
