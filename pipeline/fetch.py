"""Stage fetch: SEVIR (synthetic | s3 | local) -> data/raw (CATALOG.csv + vil/YYYY/SEVIR_VIL_*.h5).

One fetch per data.root at a time (a lock beside it); each source ends by checking, from HDF5
metadata, that every selected catalog VIL row points at an existing file holding its event.

    python -m pipeline.fetch [--params params.yaml]
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline import config as config_mod
from pipeline import sevir
from pipeline.cli import run_stage, setup_logging, stage_parser
from pipeline.config import Config
from pipeline.outputs import check_writable, writing
from pipeline.sevir.verify import verify_vil_files
from pipeline.tracking import stage_run

log = logging.getLogger("pipeline.fetch")


def fetch(cfg: Config) -> pd.DataFrame:
    """Run the configured source; returns the catalog written to ``cfg.data.root``."""
    data = cfg.data
    log.info("fetch: source=%s -> %s", data.source, data.root)
    check_writable(Path(data.root).parent, "data.root")  # before any download or generation
    with (
        writing(data.root, "data.root"),
        sevir.exclusive_lock(Path(data.root), data.lock_wait_s, what="fetch"),
    ):  # one fetch per root at a time
        if data.source == "synthetic":
            from pipeline.sevir.synthetic import generate

            catalog = generate(data.root, data.synthetic, seed=data.seed)
            verify_vil_files(catalog, Path(data.root), "rerun fetch")
        elif data.source == "s3":
            from pipeline.sevir.s3 import fetch_s3

            catalog = fetch_s3(data.root, data.s3)  # checks the files itself, before writing the catalog
        else:
            from pipeline.sevir.local import use_local

            catalog = use_local(Path(data.root), data.local)  # checks the files before pointing data.root at them
    n_vil = int((catalog["img_type"].astype(str).str.lower() == "vil").sum())
    log.info("fetch: done, %d catalog rows (%d VIL) in %s", len(catalog), n_vil, data.root)
    return catalog


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__.splitlines()[0]).parse_args(argv)
    setup_logging(args.verbose)
    cfg = config_mod.load(args.params)
    with stage_run(cfg, "fetch", ("data",)) as mlflow:
        catalog = fetch(cfg)
        vil = sevir.vil_rows(catalog)
        mlflow.log_metrics(
            {"catalog_rows": len(catalog), "vil_events": len(vil), "vil_files": vil["file_name"].nunique()}
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
