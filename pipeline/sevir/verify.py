"""Fetch's last check: every selected catalog VIL row points at a usable file, from HDF5 metadata only.

For each file the selected rows reference: it exists (symlinks followed), opens as HDF5, holds
``id`` (N,) and ``vil`` (N, H, W, T) uint8 with the same N, N covers every ``file_index`` the rows
use, and the ids stored at those indices are the rows' ids. Only the ``id`` dataset and the
dataset headers are read, never an image, so checking a whole SEVIR year takes seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from pipeline.errors import DataError
from pipeline.sevir.format import safe_join, vil_rows

log = logging.getLogger("pipeline.fetch")


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str  # "" for a missing file


def check_file(path: Path, rows: pd.DataFrame) -> Problem | None:
    """What is wrong with ``path`` for catalog ``rows`` (its VIL rows), or None."""
    if not path.is_file():
        return Problem(path, "")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        return Problem(path, f"not a readable HDF5 file ({err}); it is corrupt or truncated")
    with h5:
        if "vil" not in h5 or "id" not in h5 or not isinstance(h5["vil"], h5py.Dataset):
            return Problem(path, f"expected datasets 'id' and 'vil', found {sorted(h5)}; not a SEVIR VIL file")
        vil, ids = h5["vil"], h5["id"]
        if vil.ndim != 4 or vil.dtype != np.uint8:
            return Problem(path, f"dataset 'vil' is {vil.dtype} with shape {vil.shape}; expected uint8 N x H x W x T")
        if ids.ndim != 1 or ids.shape[0] != vil.shape[0]:
            return Problem(path, f"'id' has shape {ids.shape} but 'vil' holds {vil.shape[0]} events")
        index = rows["file_index"].to_numpy(np.int64)
        n = int(vil.shape[0])
        if index.size and (index.min() < 0 or index.max() >= n):
            k = int(np.argmax((index < 0) | (index >= n)))
            return Problem(path, f"holds {n} events but catalog event {rows['id'].iloc[k]!r} has file_index {index[k]}")
        stored = np.array([i.decode() if isinstance(i, bytes) else str(i) for i in ids[:]], dtype=object)
        wrong = stored[index] != rows["id"].to_numpy(dtype=object)
        if wrong.any():
            k = int(np.flatnonzero(wrong)[0])
            return Problem(
                path, f"row {index[k]} holds event {stored[index[k]]!r} but the catalog says {rows['id'].iloc[k]!r}"
            )
    return None


def verify_vil_files(catalog: pd.DataFrame, data_root: Path, fix: str, where: str = "") -> int:
    """Check every file the catalog's VIL rows reference under ``data_root``; return how many.

    Raises one :class:`DataError` line: how many files are missing (or unusable), the first one,
    and ``fix``. ``where`` (e.g. "bucket layout") is added after the root in the message.
    """
    events = vil_rows(catalog)
    groups = list(events.groupby("file_name", sort=True))
    missing: list[Path] = []
    bad: list[Problem] = []
    for name, rows in groups:
        problem = check_file(safe_join(data_root, str(name)), rows)
        if problem is None:
            continue
        (missing.append(problem.path) if not problem.reason else bad.append(problem))
    at = f"{data_root}{f' ({where})' if where else ''}"
    if missing:
        n_events = int(events["file_name"].isin([str(p.relative_to(data_root)) for p in missing]).sum())
        raise DataError(f"{len(missing)} of {len(groups)} VIL files the selected catalog rows reference "
                        f"({n_events} events) are missing under {at}; first: {missing[0]}; {fix}")  # fmt: skip
    if bad:
        raise DataError(f"{len(bad)} of {len(groups)} VIL files under {at} are not usable; first: {bad[0].path}: "
                        f"{bad[0].reason}; {fix}")  # fmt: skip
    log.info("checked %d VIL file(s) under %s: all %d selected events present (ids and counts from HDF5 metadata)",
             len(groups), at, len(events))  # fmt: skip
    return len(groups)
