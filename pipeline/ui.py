"""The MLflow UI on the project's store, opened straight into the runs table.

    python -m pipeline.ui [--params params.yaml] [--host 127.0.0.1] [--port 5000]    (make ui)

Serves ``tracking.uri`` (default: sqlite mlflow.db at the repository root) with ``mlflow server``
and prints the runs-table link, ``#/experiments/<id>/runs?workflowType=machine_learning``:
MLflow 3 otherwise opens an experiment on its GenAI (traces) view.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline import config as config_mod
from pipeline.cli import run_stage, setup_logging, stage_parser
from pipeline.tracking import ensure_experiment, runs_table_url


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for a team server)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--dry-run", action="store_true", help="print the link and the server command, start nothing")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = config_mod.load(args.params)
    uri, experiment_id = ensure_experiment(cfg)
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(
        f"MLflow runs table ({cfg.tracking.experiment}): {runs_table_url(f'http://{shown}:{args.port}', experiment_id)}",
        flush=True,
    )
    if args.dry_run:
        print(" ".join(cmd))
        return
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
