"""The ``data.source: local`` fetch: an existing SEVIR directory, used in place without copying.

Two layouts are understood:

* **bucket** (what ``aws s3 sync --no-sign-request s3://sevir DIR`` leaves)::

      DIR/CATALOG.csv
      DIR/data/vil/2019/SEVIR_VIL_*.h5        catalog file_name is relative to DIR/data

* **flat** (this pipeline's own ``data/raw``)::

      DIR/CATALOG.csv
      DIR/vil/2019/SEVIR_VIL_*.h5             catalog file_name is relative to DIR

``data.local.data_prefix`` names the folder ``file_name`` is relative to (``data`` or ``""``);
left null, the layout is detected from where the catalog's files are. Folders inside may be
symlinks (e.g. ``vil/`` linked in from a shared disk).

The fetch writes into ``data.root`` the catalog's selected VIL rows (``data.local.years``,
``event_types``; values as in the source catalog) and a ``SOURCE_ROOT`` file naming the folder
the file names resolve against (:func:`pipeline.sevir.data_root_of`), after checking that every
selected row's file is there with the right ids (:mod:`pipeline.sevir.verify`). Nothing is
replaced unless that check passes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from pipeline.config import LocalSource
from pipeline.errors import DataError
from pipeline.sevir.format import CATALOG_NAME, SOURCE_ROOT_NAME, atomic_dir, read_catalog_file, safe_join
from pipeline.sevir.selection import join, select_vil_rows
from pipeline.sevir.verify import verify_vil_files

log = logging.getLogger("pipeline.fetch")

BUCKET_PREFIX = "data"  # the bucket's data folder: s3://sevir/data/vil/...
PROBE_FILES = 32  # files looked up on disk to detect the layout


def read_catalog_text(path: Path) -> pd.DataFrame:
    """A SEVIR catalog with every value kept as text (rows are written back unchanged)."""
    return read_catalog_file(
        path,
        as_text=True,
        missing="point data.local.path at the folder holding CATALOG.csv (for an `aws s3 sync s3://sevir DIR` copy: DIR)",
        unreadable="replace it with the bucket's CATALOG.csv",
        not_sevir="not a SEVIR catalog",
    )


def detect_prefix(source: Path, file_names: list[str]) -> tuple[str, str]:
    """``(data_prefix, description)`` of the layout of ``source``: where the first files exist.

    Tries ``data/`` (bucket layout) and the root itself (flat); the one holding more of the
    first :data:`PROBE_FILES` files wins. When neither holds any, a ``data/`` folder means the
    bucket layout; the check that follows then names the missing files.
    """
    probe = file_names[:PROBE_FILES]
    found = {
        prefix: sum(safe_join(source / prefix, name).is_file() for name in probe) for prefix in (BUCKET_PREFIX, "")
    }
    if found[BUCKET_PREFIX] > found[""] or (
        found[BUCKET_PREFIX] == found[""] == 0 and (source / BUCKET_PREFIX).is_dir()
    ):
        return BUCKET_PREFIX, "bucket layout (aws s3 sync): CATALOG.csv at the root, files under data/"
    return "", "flat layout: files beside CATALOG.csv"


def use_local(root: Path, local: LocalSource) -> pd.DataFrame:
    """Point ``root`` at the SEVIR directory ``local.path`` without copying its h5 files; return the
    catalog written to ``root`` (the selected VIL rows)."""
    assert local.path is not None  # checked by the config
    source = Path(os.path.abspath(local.path.expanduser()))  # absolute, symlinks kept as they are
    if not source.is_dir():
        raise DataError(f"data.local.path = {local.path}: not a directory; point it at a SEVIR copy holding "
                        "CATALOG.csv (and data/vil/... or vil/...)")  # fmt: skip
    catalog = read_catalog_text(source / CATALOG_NAME)
    rows, files = select_vil_rows(catalog, local.years, local.event_types, source=str(source / CATALOG_NAME),
                                  keys="data.local")  # fmt: skip
    if local.data_prefix is not None:
        prefix, layout = local.data_prefix.strip("/"), f"data.local.data_prefix = {local.data_prefix!r}"
    else:
        prefix, layout = detect_prefix(source, files)
    data_root = source / prefix if prefix else source
    log.info("data.local.path %s: %s; file names resolve against %s", source, layout, data_root)
    log.info("selected %d VIL events in %d file(s) (years %s, event types %s)",
             len(rows), len(files), join(local.years) or "all", join(local.event_types) or "all")  # fmt: skip
    other = "" if prefix else BUCKET_PREFIX
    fix = (f"check data.local.path (the folder holding {CATALOG_NAME}) and data.local.data_prefix "
           f"(file_name is relative to it; try {other!r}), copy the missing files, "
           "or narrow data.local.years / data.local.event_types to the files you have")  # fmt: skip
    verify_vil_files(rows, data_root, fix, where=layout.split(":")[0])
    with atomic_dir(root) as tmp:
        rows.to_csv(tmp / CATALOG_NAME, index=False)
        (tmp / SOURCE_ROOT_NAME).write_text(f"{data_root}\n")
    return rows
