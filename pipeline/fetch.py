"""Stage fetch: SEVIR (synthetic | s3 | local) -> data/raw (CATALOG.csv + vil/YYYY/SEVIR_VIL_*.h5).

    python -m pipeline.fetch [--params params.yaml]
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

from pipeline import config as config_mod
from pipeline import sevir
from pipeline.cli import run_stage, setup_logging, stage_parser
from pipeline.config import Config, LocalSource
from pipeline.errors import DataError
from pipeline.tracking import stage_run

log = logging.getLogger("pipeline.fetch")


def use_local(root: Path, local: LocalSource) -> pd.DataFrame:
    """Point ``root`` at an existing SEVIR directory without copying its h5 files.

    ``root`` gets a copy of the catalog (small) and a ``SOURCE_ROOT`` file naming the
    directory; :func:`pipeline.sevir.data_root_of` resolves file names against it.
    """
    assert local.path is not None  # checked by the config
    source = local.path.expanduser().resolve()
    if not source.is_dir():
        raise DataError(f"data.local.path = {local.path}: not a directory; point it at a SEVIR root holding CATALOG.csv and vil/")
    catalog = sevir.read_catalog(source)
    with sevir.atomic_dir(root) as tmp:
        shutil.copyfile(source / sevir.CATALOG_NAME, tmp / sevir.CATALOG_NAME)
        (tmp / sevir.SOURCE_ROOT_NAME).write_text(f"{source}\n")
    return catalog


def fetch(cfg: Config) -> pd.DataFrame:
    """Run the configured source; returns the catalog written to ``cfg.data.root``."""
    data = cfg.data
    log.info("fetch: source=%s -> %s", data.source, data.root)
    if data.source == "synthetic":
        from pipeline.sevir.synthetic import generate

        catalog = generate(data.root, data.synthetic, seed=data.seed)
    elif data.source == "s3":
        from pipeline.sevir.s3 import fetch_s3

        catalog = fetch_s3(data.root, data.s3)
    else:
        catalog = use_local(data.root, data.local)
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
        mlflow.log_metrics({"catalog_rows": len(catalog), "vil_events": len(vil), "vil_files": vil["file_name"].nunique()})


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
