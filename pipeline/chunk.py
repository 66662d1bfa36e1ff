"""Stage chunk: data/raw -> data/windows/{train,val,test}.h5 + reports/data/chunk_stats.json.

    python -m pipeline.chunk [--params params.yaml] [--stats reports/data/chunk_stats.json]

Splits the catalog's VIL events chronologically (data.split, on each event's whole frame span;
events straddling a boundary are dropped and counted in the stats), cuts each event into
input+target windows (windows.*) and writes one HDF5 file per split; see
:mod:`pipeline.sevir.windows` for the file layout and the window rule.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import config as config_mod
from pipeline.cli import run_stage, setup_logging, stage_parser
from pipeline.outputs import check_writable, writing
from pipeline.sevir.windows import write_windows
from pipeline.tracking import flatten, numeric_metrics, stage_run

STATS_PATH = Path(
    "reports/data/chunk_stats.json"
)  # a plain report (not DVC metrics: dvc exp show leads with scores); also in MLflow


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--stats", type=Path, default=STATS_PATH, help=f"stats JSON (default: {STATS_PATH})")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = config_mod.load(args.params)
    check_writable(cfg.windows.root, "windows.root")  # folders that cannot take files are refused before any read
    check_writable(args.stats.parent, "--stats")
    with stage_run(cfg, "chunk", ("windows",)) as mlflow:
        mlflow.log_params(flatten("data.split", cfg.data.split))
        with writing(cfg.windows.root, "windows.root"):
            stats = write_windows(cfg.data.root, cfg.windows, cfg.data.split, stats_path=args.stats)
        mlflow.log_metrics(numeric_metrics(stats))
        mlflow.log_artifact(str(args.stats))


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
