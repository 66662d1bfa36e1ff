"""Which catalog VIL rows and files a fetch keeps: by year, event type and caps (s3 and local alike)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import DataError
from pipeline.sevir.format import CATALOG_NAME, vil_rows

log = logging.getLogger("pipeline.fetch")

_ROW = "__catalog_row"  # temporary column: position of a row in the catalog


def select_vil_rows(
    catalog: pd.DataFrame,
    years: Sequence[int],
    event_types: Sequence[str],
    *,
    max_events: int = 0,
    max_files: int = 0,
    source: str = CATALOG_NAME,
    keys: str = "data.s3",
) -> tuple[pd.DataFrame, list[str]]:
    """Pick the catalog rows and files to use; return ``(rows, file_names)``.

    Rows: :func:`pipeline.sevir.vil_rows` (VIL, no missing data, one per id) whose year is in
    ``years`` (the ``vil/<year>/`` folder of ``file_name``, else the year of ``time_utc``; empty
    keeps all) and whose ``event_type`` is in ``event_types`` (case-insensitive; empty keeps all);
    then the first ``max_events`` in time order (0 = all). Files: those the rows need, in order
    of their first event, the first ``max_files`` (0 = all); rows in other files are dropped.
    ``rows`` are the untouched catalog rows, in catalog order. ``keys`` names the params section
    in messages (``data.s3`` or ``data.local``).
    """
    if "event_type" not in catalog.columns:
        if event_types:
            raise DataError(f"{source}: no event_type column, so {keys}.event_types cannot select; set it to []")
        catalog = catalog.assign(event_type="")
        drop_type = True
    else:
        drop_type = False
    events = vil_rows(catalog.assign(**{_ROW: np.arange(len(catalog))}))
    available_years = sorted(set(event_years(events)))
    available_types = sorted(set(events["event_type"].astype(str).str.strip()) - {""})
    if years:
        events = events[event_years(events).isin(list(years))]
    if event_types:
        types = events["event_type"].astype(str).str.strip().str.lower()
        for wanted in event_types:
            if not (types == wanted.strip().lower()).any():
                log.warning("%s.event_types: %r matches no VIL event in the selected years; known types: %s",
                            keys, wanted, join(available_types))  # fmt: skip
        events = events[types.isin([t.strip().lower() for t in event_types])]
    if max_events:
        events = events.head(max_events)
    files = list(dict.fromkeys(events["file_name"].astype(str)))
    if max_files and len(files) > max_files:
        log.info(
            "%s.max_files = %d: keeping %d of %d files and the events in them", keys, max_files, max_files, len(files)
        )
        files = files[:max_files]
        events = events[events["file_name"].isin(files)]
    if events.empty:
        raise DataError(
            f"{source}: no VIL events match {keys}.years [{join(years) or 'all'}] and event_types "
            f"[{join(event_types) or 'all'}]; the catalog has VIL years [{join(available_years)}] "
            f"and event types [{join(available_types)}]"
        )
    rows = catalog.iloc[np.sort(events[_ROW].to_numpy())]
    if drop_type:
        rows = rows.drop(columns="event_type")
    return rows.reset_index(drop=True), files


def event_years(events: pd.DataFrame) -> pd.Series:
    """Year of each event: the ``<type>/<year>/`` folder of its file, else its ``time_utc``."""
    folder = events["file_name"].astype(str).str.extract(r"^[^/]+/(\d{4})/", expand=False)
    return pd.to_numeric(folder, errors="coerce").fillna(events["time_utc"].dt.year).astype(int)


def join(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values)
