"""The SEVIR format: catalog schema, h5 layout, VIL decoding, safe paths, atomic writes.

Layout of a SEVIR root (the bucket's ``data/`` folder, or ``data/raw`` here)::

    CATALOG.csv                                   21 columns, one row per (event, image type)
    vil/2018/SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5
        id   (N,)            event ids, bytes ("S..." storm, "R..." random)
        vil  (N, H, W, T)    uint8, 0-255 (decode with :func:`vil_to_kgm2`), T = 49 at 5 min

``file_name`` in the catalog is relative to the root; ``file_index`` is the row
in that file's ``vil`` dataset.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from pipeline.errors import DataError

log = logging.getLogger("pipeline.sevir")

CATALOG_NAME = "CATALOG.csv"
CATALOG_COLUMNS = [
    "id", "file_name", "file_index", "img_type", "time_utc", "minute_offsets", "episode_id",
    "event_id", "event_type", "llcrnrlat", "llcrnrlon", "urcrnrlat", "urcrnrlon", "proj",
    "size_x", "size_y", "height_m", "width_m", "data_min", "data_max", "pct_missing",
]  # fmt: skip
# Columns a VIL pipeline cannot work without.
REQUIRED_COLUMNS = ["id", "file_name", "file_index", "img_type", "time_utc", "pct_missing"]

FRAMES = 49  # per event, 5 minutes apart
FRAME_MINUTES = 5
VIL_SIZE = 384  # pixels per side, 1 km each
PROJ = "+proj=laea +lat_0=38 +lon_0=-98 +units=m +a=6370997.0 +ellps=sphere"
# Standard verification thresholds on the 0-255 scale (~0.15 ... 32.2 kg/m^2).
VIL_THRESHOLDS = (16, 74, 133, 160, 181, 219)
EVENT_KINDS = ("STORMEVENTS", "RANDOMEVENTS", "ALLEVENTS")


def vil_to_kgm2(x: np.ndarray) -> np.ndarray:
    """Decode stored VIL (0-255) to physical vertically integrated liquid in kg/m^2."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    mid = (x > 5) & (x <= 18)
    out[mid] = (x[mid] - 2.0) / 90.66
    high = x > 18
    out[high] = np.exp((x[high] - 83.9) / 38.9)
    return out


def vil_file_name(year: int, events: str, start_mmdd: str, end_mmdd: str) -> str:
    """Catalog-style relative name, e.g. ``vil/2018/SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5``."""
    if events not in EVENT_KINDS:
        raise ValueError(f"events must be one of {EVENT_KINDS}, got {events!r}")
    return f"vil/{year}/SEVIR_VIL_{events}_{year}_{start_mmdd}_{end_mmdd}.h5"


def safe_join(root: Path, file_name: str, what: str = "file_name") -> Path:
    """``root / file_name``, refusing names that escape ``root`` lexically.

    Refused: empty names, absolute paths (``/x``, ``\\x``), drive or URL prefixes (``C:``,
    ``s3:``) and any ``..`` component. Nothing is resolved on disk, so folders inside ``root``
    that are symlinks (a ``vil/`` linked in from a shared disk) are followed like any other.
    """
    name = str(file_name)
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ":" in re.split(r"[/\\]", name)[0]:
        raise DataError(f"{what} {name!r} is not a relative path under the data root; fix the catalog row")
    if ".." in re.split(r"[/\\]", name):
        raise DataError(f"{what} {name!r} escapes the data root ('..'); fix the catalog row")
    return root / name


def read_catalog(root: Path) -> pd.DataFrame:
    """Read ``root/CATALOG.csv`` and check it has the columns a VIL pipeline needs."""
    return read_catalog_file(
        root / CATALOG_NAME,
        missing="run the fetch stage (dvc repro fetch) or fix data.root",
        unreadable="delete it and rerun fetch",
        not_sevir=f"a SEVIR catalog has {', '.join(CATALOG_COLUMNS)}",
    )


def read_catalog_file(
    path: Path, *, missing: str, unreadable: str, not_sevir: str, as_text: bool = False
) -> pd.DataFrame:
    """A catalog CSV checked for the columns a VIL pipeline needs. Each failure is one DataError
    line naming ``path`` and ending in the given fix: file ``missing``, ``unreadable`` as CSV,
    columns missing (``not_sevir``). ``as_text`` keeps every value as written (strings, no NA
    parsing), for catalogs that are written back row for row."""
    if not path.is_file():
        raise DataError(f"{path}: catalog not found; {missing}")
    try:
        if as_text:
            catalog = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
        else:
            catalog = pd.read_csv(path, low_memory=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err}); {unreadable}") from None
    absent = [c for c in REQUIRED_COLUMNS if c not in catalog.columns]
    if absent:
        raise DataError(f"{path}: missing column(s) {', '.join(absent)}; {not_sevir}")
    return catalog


def vil_rows(catalog: pd.DataFrame) -> pd.DataFrame:
    """VIL rows with no missing data, one per event id, with ``time_utc`` parsed; sorted by time."""
    rows = catalog[catalog["img_type"].astype(str).str.lower() == "vil"]
    rows = rows[pd.to_numeric(rows["pct_missing"], errors="coerce") == 0]
    rows = rows.drop_duplicates(subset="id", keep="first").copy()
    rows["time_utc"] = pd.to_datetime(rows["time_utc"], errors="coerce")
    bad = rows["time_utc"].isna()
    if bad.any():
        raise DataError(f"{CATALOG_NAME}: unparseable time_utc for event {rows.loc[bad, 'id'].iloc[0]!r}")
    rows["file_index"] = pd.to_numeric(rows["file_index"], errors="raise").astype(np.int64)
    return rows.sort_values(["time_utc", "id"], kind="stable").reset_index(drop=True)


class VilFile:
    """A SEVIR VIL h5 file opened for streaming reads, checked for the expected layout."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise DataError(f"{path}: VIL file referenced by the catalog is missing; rerun fetch")
        try:
            self._h5 = h5py.File(path, "r")
        except OSError as err:
            raise DataError(
                f"{path}: not a readable HDF5 file ({err}); it is corrupt or truncated, delete it and rerun fetch"
            ) from None
        try:
            if "vil" not in self._h5 or "id" not in self._h5:
                raise DataError(f"{path}: expected datasets 'id' and 'vil' (N x H x W x T uint8); not a SEVIR VIL file")
            vil = self._h5["vil"]
            if vil.ndim != 4 or vil.dtype != np.uint8:
                raise DataError(
                    f"{path}: dataset 'vil' is {vil.dtype} with shape {vil.shape}; expected uint8 N x H x W x T"
                )
            self.vil = vil
            self.ids = [i.decode() if isinstance(i, bytes) else str(i) for i in self._h5["id"][:]]
        except BaseException:
            self._h5.close()
            raise
        self._raw: tuple[int, int] | None | bool = False  # (fd, offset) once looked up; None: not plain bytes

    def contiguous(self) -> tuple[int, int] | None:
        """``(fd, byte offset)`` of the ``vil`` dataset when it is stored as plain contiguous bytes
        (no chunks, no filters, no external storage: how SEVIR's files are written), else None.

        Event ``i`` is then the ``H*W*T`` bytes at ``offset + i*H*W*T``: mapped from the page cache
        with no copy, or read with ``os.preadv`` into any buffer (~the speed of a plain read), with
        the GIL free meanwhile (an h5py read holds it). The descriptor is opened on the first call,
        marked for sequential read-ahead, and closed with the file.
        """
        if self._raw is False:
            self._raw = None
            try:
                plist = self.vil.id.get_create_plist()
                offset = self.vil.id.get_offset()
                if plist.get_layout() == h5py.h5d.CONTIGUOUS and plist.get_external_count() == 0 and offset is not None:
                    self._raw = (os.open(self.path, os.O_RDONLY), int(offset))
                    # Events are read in file order: a wider read-ahead (measured: cold chunk runs a few
                    # % faster and steadier when the events are mapped).
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(self._raw[0], 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError, RuntimeError, ValueError):
                self._raw = None
        return self._raw  # type: ignore[return-value]

    @property
    def n_events(self) -> int:
        return int(self.vil.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int]:
        return int(self.vil.shape[1]), int(self.vil.shape[2])

    @property
    def n_frames(self) -> int:
        return int(self.vil.shape[3])

    def read(self, start: int, stop: int | None = None) -> np.ndarray:
        """Events ``start:stop`` as uint8 (n, H, W, T); raises DataError on a corrupt or truncated file."""
        stop = start + 1 if stop is None else stop
        if not 0 <= start < stop <= self.n_events:
            raise DataError(
                f"{self.path}: file_index {start}..{stop - 1} out of range (file holds {self.n_events} events); fix the catalog"
            )
        try:
            return self.vil[start:stop]
        except (OSError, RuntimeError, ValueError) as err:
            raise DataError(
                f"{self.path}: read of events {start}..{stop - 1} failed ({err}); the file is corrupt or truncated, delete it and rerun fetch"
            ) from None

    def close(self) -> None:
        if isinstance(self._raw, tuple):
            with contextlib.suppress(OSError):
                os.close(self._raw[0])
            self._raw = None
        self._h5.close()

    def __enter__(self) -> VilFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; it replaces ``path`` only if the block succeeds.

    A failed or interrupted stage therefore never leaves a half-written output folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


SOURCE_ROOT_NAME = "SOURCE_ROOT"  # in data/raw when data.source is local: the real SEVIR directory


def data_root_of(raw_dir: Path) -> Path:
    """Where the catalog's ``file_name`` paths resolve: ``raw_dir`` itself, or the directory
    named in ``raw_dir/SOURCE_ROOT`` (``data.source: local`` uses a SEVIR tree in place)."""
    pointer = raw_dir / SOURCE_ROOT_NAME
    if not pointer.is_file():
        return raw_dir
    target = Path(pointer.read_text().strip())
    if not target.is_dir():
        raise DataError(f"{pointer}: points at {target}, which is not a directory; fix data.local.path and rerun fetch")
    return target


def lock_path(target: Path) -> Path:
    """The lock file guarding writes into ``target``: ``.<name>.lock`` beside it (outside it, so
    replacing ``target`` as a whole, as :func:`atomic_dir` does, keeps the lock in place)."""
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive_lock(target: Path, wait_s: float, what: str = "fetch", key: str = "data.lock_wait_s") -> Iterator[None]:
    """Hold an exclusive lock on ``target`` for one writer at a time (``flock`` of :func:`lock_path`).

    A second writer waits up to ``wait_s`` seconds for the first (logged once), then stops with
    one DataError line naming the holder; ``wait_s = 0`` stops at once. The kernel drops the lock
    of a killed process, so a crash never leaves ``target`` locked. On a file system without
    locks a warning is logged and the run goes on unguarded.
    """
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            _acquire(fd, path, target, wait_s, what, key)
        except OSError as err:
            log.warning("cannot lock %s (%s); make sure no other %s writes into %s", path, err, what, target)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {dt.datetime.now().isoformat(timespec='seconds')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, path: Path, target: Path, wait_s: float, what: str, key: str) -> None:
    def holder() -> str:
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return f" ({text})"
        return ""

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    if wait_s <= 0:
        raise DataError(f"{target}: another {what}{holder()} is writing into it; wait for it to finish (or stop it) "
                        f"and rerun, or set {key} > 0 to wait")  # fmt: skip
    log.warning("%s: another %s%s is writing into it; waiting up to %.0f s for it to finish (%s)",
                target, what, holder(), wait_s, key)  # fmt: skip
    deadline = time.monotonic() + wait_s
    while True:
        time.sleep(0.1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            log.info("%s: the other %s finished; going on", target, what)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DataError(f"{target}: another {what}{holder()} is still writing into it after {wait_s:.0f} s; "
                                f"wait for it to finish (or stop it) and rerun, or raise {key}") from None  # fmt: skip
