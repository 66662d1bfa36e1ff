"""Stage evaluate: the phase-2 model and the baselines, scored on the test (or val) windows.

    python -m pipeline.evaluate [--params params.yaml] [--split val|test] [--checkpoint PATH]

Reads ``<train.checkpoint_dir>/phase2/best.pt`` and ``<windows.root>/<split>.h5``; writes
``<evaluate.reports_dir>/``: metrics.json (the headline, DVC metrics), scores.json (every score),
per_lead/*.csv (DVC plots),
plots/*.png (per-lead curves, forecast gallery) and summary.md; logs everything to a nested
MLflow ``evaluate`` run and the headline numbers to the pipeline's parent run.
See :mod:`pipeline.scoring` for the scores and :mod:`pipeline.scoring.reports` for the files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException

from pipeline import config as config_mod
from pipeline.cli import run_stage, setup_logging, stage_parser
from pipeline.errors import PipelineError
from pipeline.outputs import OutputSet, check_writable, writing
from pipeline.scoring import evaluation, reports
from pipeline.scoring.forecasters import get_method, model_from_checkpoint
from pipeline.scoring.mlflow_log import log_evaluation, log_model
from pipeline.sevir.dataset import check_windows_file
from pipeline.tracking import log_windows_inputs, stage_run
from pipeline.training.checkpoint import check_phase, read_checkpoint
from pipeline.training.loop import cpu_threads

log = logging.getLogger("pipeline.evaluate")


def resolve_device(device: str, precision: str) -> tuple[torch.device, str]:
    """``train.device`` / ``train.precision`` -> a torch device and fp32 | bf16 | fp16 for inference."""
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device = cuda but no CUDA device is visible; set train.device: auto or cpu")
    dev = torch.device("cuda" if device in {"auto", "cuda"} and torch.cuda.is_available() else "cpu")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return dev, precision


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--split", choices=["val", "test"], default=None, help="windows scored (default: evaluate.split)"
    )
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint (default: <train.checkpoint_dir>/phase2/best.pt)")  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = config_mod.load(args.params)
    torch.set_num_threads(cpu_threads(cfg.train.threads, 1))
    split = args.split or cfg.evaluate.split
    ckpt_path = args.checkpoint or cfg.train.checkpoint_dir / "phase2" / "best.pt"
    if not ckpt_path.is_file():
        raise PipelineError(f"{ckpt_path}: no phase-2 checkpoint; run train_phase2 first (dvc repro train_phase2)")

    out = cfg.evaluate.reports_dir
    # the stage's outputs, replaced as one set (metrics.json last: DVC's metrics appear with the rest)
    outputs = OutputSet(
        out, ["per_lead", "plots", "summary.md", "scores.json", "metrics.json"], "evaluate", "evaluate.reports_dir"
    )
    with writing(out, "evaluate.reports_dir"):
        outputs.recover()  # a set a killed run committed is finished before anything else
    check_writable(out, "evaluate.reports_dir")

    if args.checkpoint is None:  # the stage scores phase 2; another phase's file there is a mistake
        check_phase(ckpt_path, 2, "rerun train_phase2 (dvc repro train_phase2), or pass --checkpoint to score it")
    ckpt = read_checkpoint(ckpt_path)
    windows_path = cfg.windows.root / f"{split}.h5"
    check_windows_file(windows_path, cfg.windows.frame_step)  # the frame size is checked against the model's
    dataset = evaluation.open_windows(windows_path, ckpt["data"])
    device, precision = resolve_device(cfg.train.device, cfg.train.precision)
    forecasters = {"model": model_from_checkpoint(ckpt_path, cfg.model, device=device, precision=precision)}
    forecasters.update({name: get_method(name) for name in cfg.evaluate.baselines})
    minutes = evaluation.frame_minutes(windows_path)  # lead j is j x minutes (10 at windows.frame_step 2)
    log.info("evaluate: %s split, %d windows (%d-minute frames), checkpoint %s (phase %s, epoch %s), %s, on %s %s",
             split, len(dataset), minutes, ckpt_path, ckpt.get("phase"), ckpt.get("epoch"), ", ".join(forecasters),
             device, precision)  # fmt: skip

    with stage_run(cfg, "evaluate", ("evaluate",)) as mlflow:
        mlflow.log_params({"evaluate.split_scored": split, "evaluate.checkpoint": str(ckpt_path),
                           "evaluate.frame_minutes": minutes})  # fmt: skip
        result = evaluation.evaluate(dataset, forecasters, cfg.evaluate, device=device,
                                     num_workers=cfg.train.num_workers)  # fmt: skip
        if result.scores["model"]["mse"] is None:
            raise PipelineError(
                f"{ckpt_path}: the model forecasts NaN or inf on the {split} split; retrain (dvc repro train_phase2)"
            )
        doc = reports.metrics_document(result.scores, result.windows)
        tables = reports.per_lead_tables(result.scores, frame_minutes=minutes)
        examples = evaluation.forecast_examples(dataset, forecasters, result.examples, device=device)
        names = [f"{info['event_id']}\nframe {info['start']}" for info in map(dataset.info, result.examples)]
        leads = cfg.evaluate.gallery_leads(int(ckpt["data"]["out_len"]))
        title = f"{split}, {result.windows} windows"
        with outputs as staged:  # written beside reports, then moved into place together
            csvs = reports.write_per_lead_csvs(staged / "per_lead", tables)
            pngs = reports.plot_per_lead(staged / "plots", tables, list(forecasters), title=title)
            gallery = reports.plot_gallery(staged / "plots" / "gallery.png", examples, leads, names,
                                           frame_minutes=minutes)  # fmt: skip
            reports.write_atomic(staged / "summary.md", reports.summary_markdown(doc, split))
            reports.write_metrics(staged / "scores.json", doc)  # every score: a plain report
            reports.write_metrics(staged / "metrics.json", reports.headline_document(doc))  # the DVC metrics
        placed = [out / Path(p).relative_to(staged) for p in [*csvs, *pngs, *([gallery] if gallery else [])]]
        metrics_path, scores_path, summary = out / "metrics.json", out / "scores.json", out / "summary.md"
        try:  # the reports are on disk: a tracking store that cannot take them costs a warning
            log_evaluation(
                mlflow, doc, tables, split, files=[metrics_path, scores_path, summary, *placed], reports_dir=out
            )
            # the windows as dataset inputs, the phase-2 weights as the registered MLflow model of this run
            digests = log_windows_inputs(mlflow, cfg.windows.root, ("train", "val", "test"), on_parent=True)
            log_model(mlflow, forecasters["model"].model, ckpt["model_config"], ckpt["data"], minutes, doc, split,
                      digests.get(split))  # fmt: skip
        except (OSError, MlflowException) as err:
            log.warning("MLflow: could not log the evaluation (%s); the reports in %s are complete",
                        (str(err).strip().splitlines() or [type(err).__name__])[0][:160], out)  # fmt: skip
    print(reports.summary_markdown(doc, split))


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
