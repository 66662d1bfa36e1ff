"""Cut SEVIR VIL events into chronological train/val/test windows: the library behind stage chunk.

Output, one HDF5 file per split in ``windows.root`` (``train.h5``, ``val.h5``, ``test.h5``). Each
event is stored once, time-major; its overlapping windows are an index into it::

    vil           (E, F, H, W) uint8 0-255   one row per event: its F stored frames, from the first
                                             window's long clip start to the last window's end;
                                             chunks (1, 1, H, W): one frame per chunk
    event_id      (E,) bytes                 SEVIR event id of each row
    time_utc      (E,) int64                 the event's catalog time_utc, seconds since 1970-01-01 UTC
    frame_offset  (E,) int32                 index of the row's first stored frame in the original event
    window_event  (N,) int32                 row of ``vil`` each window is cut from
    window_start  (N,) int32                 frame of that row where the window starts
    attrs         split, in_len, out_len, stride, frame_step, frame_minutes, window_len (L), long_len
                  (M; = L when memory_len is null), downsample, train_end, val_end, scale ("uint8
                  0-255; divide by 255"), time_utc_units

``frame_step`` k keeps frames 0, k, 2k, ... of each event (k = 2: 10-minute steps, SEVIR-LR); an
event of T frames keeps ``T' = floor((T - 1) / k) + 1`` (49 -> 25 at k = 2). Rows store kept frames
only, so window ``i`` is ``vil[e, s : s + L]`` with ``e, s = window_event[i], window_start[i]``: L
whole chunks, nothing read twice, and its first frame is frame ``frame_offset[e] + k * s`` of the
original event. Its phase-1 long clip is ``vil[e, s + L - M : s + L]``; no second copy. Rows of
events with fewer frames than F (a file with shorter events) end in unused zero frames.

Window starts are 0, stride, 2*stride, ... (in kept frames) while the window fits in the event's T'
kept frames, so an event yields ``floor((T' - L) / stride) + 1`` windows (T' >= L). When
``memory_len`` M > L a window is kept only if its long clip fits too (start >= M - L); the grid is
not shifted, so the count is ``floor((T' - L) / stride) - ceil((M - L) / stride) + 1``.
:func:`window_starts` is the one rule (on T'); :func:`kept_frames` gives T'.

Splits are chronological on each event's whole frame span, from its catalog ``time_utc`` (the
middle frame) and its file's frame count: train ends before ``train_end``, val lies in
[train_end, val_end), test starts at or after ``val_end``; an event straddling a boundary is
dropped and counted (:func:`assign_splits`), so no split's frames overlap the next one's.

Events are streamed: grouped by file, in ``file_index`` order, ``chunk_events`` at a time, so
memory stays at a few events whatever the file size. The main thread maps each batch's bytes from
the page cache (:func:`read_block`; no copy) while ``windows.workers`` threads each take one event,
turn it time-major, count its pixels (:mod:`pipeline.sevir.kernels`) and write it straight into
its row's chunks, allocated when the file was made (:class:`SplitWriter`): all without the GIL.
Everything is written into a temporary directory that replaces ``windows.root`` only at the end
(:func:`pipeline.sevir.atomic_dir`); temporary directories left by a killed run are removed by the
next run (:func:`sweep_stale_tmp`).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import fcntl
import functools
import json
import logging
import mmap
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import sevir
from pipeline.config import SplitConfig, WindowsConfig
from pipeline.errors import DataError
from pipeline.sevir import kernels

log = logging.getLogger("pipeline.sevir.windows")

SPLITS = ("train", "val", "test")
# assign_splits' name for an event whose frames straddle a split boundary (dropped), by boundary
STRADDLES = {"train_end": "straddles_train_end", "val_end": "straddles_val_end"}
SCALE_NOTE = "uint8 0-255; divide by 255"
TIME_UNITS = "seconds since 1970-01-01 00:00:00 UTC"
# Coarse intensity bins for the stats: the standard VIL thresholds are the edges.
HIST_EDGES = (0, *sevir.VIL_THRESHOLDS, 256)


# ------------------------------------------------------------------ the window grid
def window_starts(n_frames: int, window_len: int, stride: int, long_len: int | None = None) -> list[int]:
    """Frame offsets of the windows cut from an event of ``n_frames`` frames.

    Starts are ``0, stride, 2*stride, ...`` while ``start + window_len <= n_frames``. With a long
    clip (``long_len > window_len``) a window is kept only if its clip, the ``long_len`` frames
    ending where the window ends, starts at frame 0 or later. Empty when the event is too short.
    """
    long_len = window_len if long_len is None else long_len
    first = long_len - window_len  # the earliest start whose long clip fits
    return [s for s in range(0, n_frames - window_len + 1, stride) if s >= first]


def kept_frames(n_frames: int, frame_step: int) -> int:
    """Frames left of an ``n_frames`` event keeping frames 0, frame_step, 2*frame_step, ..."""
    return (n_frames - 1) // frame_step + 1 if n_frames > 0 else 0


def stored_range(starts: list[int], window_len: int, long_len: int) -> tuple[int, int]:
    """``(first, stop)``: the frames of an event that its windows and their long clips use."""
    return starts[0] + window_len - long_len, starts[-1] + window_len


def frame_span(times: pd.Series, n_frames: int | pd.Series) -> tuple[pd.Series, pd.Series]:
    """``(first, last)``: the times of the first and last frames of events of ``n_frames`` frames
    whose catalog ``time_utc`` is ``times``. SEVIR's time_utc is an event's middle frame: frame t
    is at ``time_utc + (t - (T - 1) // 2) * 5 min`` (T = 49: -120 .. +120 min)."""
    frames = pd.Series(n_frames, index=times.index) if np.isscalar(n_frames) else n_frames
    before = (frames.astype(np.int64) - 1) // 2  # frames before the middle one
    after = frames.astype(np.int64) - 1 - before
    step = pd.Timedelta(minutes=sevir.FRAME_MINUTES)
    return times - before.to_numpy() * step, times + after.to_numpy() * step


def assign_splits(times: pd.Series, split: SplitConfig, n_frames: int | pd.Series) -> pd.Series:
    """The split of each event by its whole frame span (:func:`frame_span`), so that no train frame
    is as late as a val or test frame and no val frame as late as a test frame: ``train`` when its
    last frame is before train_end, ``val`` when its first frame is at or after train_end and its
    last before val_end, ``test`` when its first frame is at or after val_end. An event whose
    frames straddle a boundary is ``straddles_train_end`` or ``straddles_val_end`` (the first
    boundary it straddles): it belongs to no split and is dropped."""
    train_end, val_end = _naive_utc(split.train_end), _naive_utc(split.val_end)
    first, last = frame_span(times, n_frames)
    names = np.select(
        [last < train_end, first < train_end, last < val_end, first < val_end],
        ["train", STRADDLES["train_end"], "val", STRADDLES["val_end"]],
        default="test",
    )
    return pd.Series(names, index=times.index, name="split")


def _naive_utc(when: dt.datetime) -> pd.Timestamp:
    # Catalog times are naive UTC; an aware boundary from params is converted to match.
    stamp = pd.Timestamp(when)
    return stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo is not None else stamp


# ------------------------------------------------------------------- pixel transforms
def downsample(frames: np.ndarray, factor: int) -> np.ndarray:
    """Area-mean downsampling of (H, W, ...) uint8 frames by an integer ``factor`` in H and W.

    uint8 in, uint8 out on the same 0-255 scale: each output pixel is the mean of a
    ``factor x factor`` block rounded half up, computed exactly in integers.
    """
    if factor == 1:
        return frames
    h, w = frames.shape[:2]
    if h % factor or w % factor:
        raise DataError(f"frame size {h}x{w} is not divisible by windows.downsample = {factor}; pick a divisor")
    area = factor * factor
    acc = np.uint16 if area * 255 <= np.iinfo(np.uint16).max else np.uint32
    blocks = frames.reshape(h // factor, factor, w // factor, factor, *frames.shape[2:])
    # Sums of whole slices keep the inner axes contiguous: ~2.5x faster than .sum(axis=(1, 3)).
    rows = blocks[:, 0].astype(acc)  # (h/f, w/f, f, ...)
    for i in range(1, factor):
        rows += blocks[:, i]
    total = rows[:, :, 0].copy()  # (h/f, w/f, ...)
    for j in range(1, factor):
        total += rows[:, :, j]
    total += area // 2  # round half up (exact: ties only exist when area is even)
    total //= area
    return total.astype(np.uint8)


to_time_major = kernels.to_time_major  # one event (H, W, T) -> (T, H, W); see pipeline.sevir.kernels


# ------------------------------------------------------------------------ the stats
@dataclass
class SplitStats:
    """Counts for one split; pixel counts are over the distinct frames its windows cover."""

    events: int = 0  # events that gave at least one window
    windows: int = 0
    events_skipped_short: int = 0  # too few frames for one window (and its long clip)
    pixels: int = 0
    at_least: np.ndarray = field(default_factory=lambda: np.zeros(len(sevir.VIL_THRESHOLDS), np.int64))

    def add_pixels(self, frames: np.ndarray) -> None:
        """Count ``frames`` (uint8) in."""
        self.add_counts(*count_pixels(frames))

    def add_counts(self, pixels: int, at_least: np.ndarray) -> None:
        """Add what :func:`count_pixels` counted."""
        self.pixels += pixels
        self.at_least += at_least

    def as_metrics(self) -> dict[str, int | float]:
        """Flat numbers for ``dvc metrics show``: counts, exceedance fractions, coarse histogram."""
        share = (lambda n: round(float(n) / self.pixels, 6)) if self.pixels else (lambda n: 0.0)
        at_least = [self.pixels, *self.at_least.tolist(), 0]  # counts >= each edge of HIST_EDGES
        metrics: dict[str, int | float] = {
            "events": self.events,
            "windows": self.windows,
            "events_skipped_short": self.events_skipped_short,
        }
        metrics |= {f"exceed_{t}": share(n) for t, n in zip(sevir.VIL_THRESHOLDS, self.at_least.tolist(), strict=True)}
        metrics |= {
            f"hist_{lo}_{hi}": share(at_least[k] - at_least[k + 1])
            for k, (lo, hi) in enumerate(zip(HIST_EDGES[:-1], HIST_EDGES[1:], strict=True))
        }
        return metrics


def count_pixels(frames: np.ndarray) -> tuple[int, np.ndarray]:
    """``(pixels, at_least)``: how many values ``frames`` (uint8) holds and how many
    are >= each of :data:`sevir.VIL_THRESHOLDS`. Exact, in one call without the GIL
    (:func:`pipeline.sevir.kernels.count_at_least`)."""
    return frames.size, kernels.count_at_least(frames, sevir.VIL_THRESHOLDS)


# ---------------------------------------------------------------------- the writer
class SplitWriter:
    """One split's output file: each event written once as one row of ``vil``, plus the window index.

    ``n_events`` presizes ``vil`` to (n_events, n_frames, H, W), and HDF5 allocates all its
    chunks when the file is made (no fill values written), in a fixed order, so the file's bytes
    do not depend on the order rows are written in. A row's frames are then plain ``pwrite``
    calls at its chunks' addresses: no HDF5 call and no GIL per event, so rows can be written
    from worker threads, each as soon as it is ready (:meth:`write_row`). The small per-event
    and per-window records are kept in memory and written on close.
    """

    def __init__(self, path: Path, split: str, windows: WindowsConfig, splits: SplitConfig,
                 frame_shape: tuple[int, int], id_len: int, n_events: int, n_frames: int):  # fmt: skip
        self.path, self.split = path, split
        h, w = frame_shape
        self.h5 = h5py.File(path, "w", rdcc_nbytes=0)  # no chunk cache: HDF5 never holds vil's bytes
        self.h5.attrs.update({
            "split": split, "in_len": windows.in_len, "out_len": windows.out_len, "stride": windows.stride,
            "frame_step": windows.frame_step, "frame_minutes": windows.frame_step * sevir.FRAME_MINUTES,
            "window_len": windows.window_len, "long_len": windows.long_len,
            "downsample": windows.downsample, "scale": SCALE_NOTE, "time_utc_units": TIME_UNITS,
            "train_end": str(splits.train_end), "val_end": str(splits.val_end),
        })  # fmt: skip
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every chunk is written by write_row, zeros included
        self.frame_bytes, self.n_rows, self.n_frames = h * w, n_events, n_frames
        self.fd: int | None = None
        try:
            # Axis 0 is extendable only so that an empty split (0 rows) can have (1, 1, H, W) chunks.
            self.vil = self.h5.create_dataset("vil", (n_events, n_frames, h, w), np.uint8, chunks=(1, 1, h, w),
                                              maxshape=(None, n_frames, h, w), dcpl=dcpl)  # fmt: skip
            self.vil.attrs["scale"] = SCALE_NOTE
            self.addresses = self._chunk_addresses()
            self.fd = os.open(path, os.O_WRONLY) if n_events else None
        except BaseException:
            self.h5.close()
            raise
        self.lock = threading.Lock()
        self.zero_frame = np.zeros(h * w, np.uint8)  # the unused tail of rows shorter than n_frames
        self.id_dtype = f"S{id_len}"
        self.event_ids: list[bytes] = []
        self.times: list[int] = []
        self.offsets: list[int] = []
        self.window_event: list[int] = []
        self.window_start: list[int] = []
        self.n = 0

    def _chunk_addresses(self) -> np.ndarray:
        """(rows, frames) int64: the file offset of each frame's chunk, as HDF5 allocated them."""
        addresses = np.full((self.n_rows, self.n_frames), -1, np.int64)

        def seen(info) -> None:  # h5py StoreInfo: chunk_offset (row, frame, 0, 0), byte_offset, size
            addresses[info.chunk_offset[0], info.chunk_offset[1]] = info.byte_offset
            if info.size != self.frame_bytes or info.filter_mask:
                raise RuntimeError(
                    f"{self.path.name}: chunk {info.chunk_offset} is {info.size} bytes, not {self.frame_bytes}"
                )

        if self.n_rows:
            self.vil.id.chunk_iter(seen)
        if (addresses < 0).any():
            raise RuntimeError(f"{self.path.name}: HDF5 did not allocate every chunk of vil up front")
        return addresses

    def reserve(self, event_id: str, time_utc: int, frame_offset: int, starts: list[int]) -> int:
        """Record the next event (its id, time, first stored frame and its windows' starts relative
        to the stored frames); return its row, for :meth:`write_row`. Called in event order."""
        if self.n >= self.n_rows:
            raise RuntimeError(f"{self.path.name}: more events than the {self.n_rows} it was sized for")
        row = self.n
        self.n += 1
        self.event_ids.append(event_id.encode())
        self.times.append(time_utc)
        self.offsets.append(frame_offset)
        self.window_event += [row] * len(starts)
        self.window_start += starts
        return row

    def write_row(self, row: int, frames: np.ndarray) -> None:
        """Write row ``row``'s frames: ``frames`` (F', H, W) uint8, each frame C-contiguous, F' <= F;
        frames F'..F-1 of the row are zeros. Safe to call from several threads for different rows;
        raises DataError when the disk refuses the write (full, gone)."""
        n = frames.shape[0]
        if n > self.n_frames or frames.shape[1] * frames.shape[2] != self.frame_bytes:
            raise ValueError(f"{self.path.name}: frames {frames.shape} do not fit a row of {self.vil.shape[1:]}")
        addresses = self.addresses[row].tolist()
        try:
            with self.lock:  # the kernel writes to one file one call at a time: waiting here sleeps, not spins
                for t, address in enumerate(addresses):
                    # One pwrite per frame, as HDF5 writes a chunk: one pwritev of the whole row (7 MB)
                    # lets the kernel put it in large page-cache folios, measured up to 3x slower here.
                    _pwrite_all(self.fd, frames[t] if t < n else self.zero_frame, address)
        except OSError as err:
            raise DataError(f"{self.path}: cannot write the windows ({err}); free space under "
                            f"{self.path.parent.parent} or point windows.root elsewhere") from None  # fmt: skip

    def append(self, event_id: str, time_utc: int, frame_offset: int, frames: np.ndarray, starts: list[int]) -> None:
        """Write one event: :meth:`reserve` then :meth:`write_row`. ``frames`` (F', H, W) uint8, the
        stored frames, the first of which is frame ``frame_offset`` of the event; ``starts`` its
        windows' starts relative to ``frames``."""
        self.write_row(self.reserve(event_id, time_utc, frame_offset, starts), frames)

    def discard(self) -> None:
        """Close without finishing (on error): the file is left incomplete, for the caller to delete."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.h5.close()

    def close(self) -> None:
        """Write the event and window records, close the file. Call once every row is written."""
        if self.n == 0:
            log.warning("split %s is empty: %s holds 0 windows; check data.split against the catalog's time_utc range",
                        self.split, self.path.name)  # fmt: skip
        if self.n != self.n_rows:
            raise RuntimeError(f"{self.path.name}: {self.n} events written, sized for {self.n_rows}")
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for name, values in (
            ("event_id", np.array(self.event_ids, self.id_dtype)),
            ("time_utc", np.array(self.times, np.int64)),
            ("frame_offset", np.array(self.offsets, np.int32)),
            ("window_event", np.array(self.window_event, np.int32)),
            ("window_start", np.array(self.window_start, np.int32)),
        ):
            self.h5.create_dataset(name, data=values)
        self.h5["time_utc"].attrs["units"] = TIME_UNITS
        self.h5.close()


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    """Write ``data`` (C-contiguous) at ``offset`` of ``fd``, going on after a short write."""
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        if done == 0:
            raise OSError(f"wrote 0 bytes at offset {offset}")
        view, offset = view[done:], offset + done


# ---------------------------------------------------------------------- the reading
class Event(NamedTuple):
    """What a window file records of an event."""

    id: str
    split: str
    epoch_s: int  # time_utc, seconds since 1970-01-01 UTC


@dataclass(frozen=True)
class ReadBatch:
    """Events ``start:stop`` of one file, read in one call, and what to record of each."""

    file_name: str
    start: int
    stop: int
    events: list[Event]


def plan_reads(events: pd.DataFrame, chunk_events: int) -> Iterator[ReadBatch]:
    """Batches of at most ``chunk_events`` consecutive file indices, grouped by file, in file order.

    ``events`` needs columns file_name, file_index, id, split and time_utc.
    """
    ordered = events.sort_values(["file_name", "file_index"], kind="stable")
    epoch_s = ordered["time_utc"].astype("datetime64[s]").astype(np.int64)
    records = [Event(*r) for r in zip(ordered["id"].astype(str), ordered["split"], epoch_s.tolist(), strict=True)]
    names, index = ordered["file_name"].astype(str).to_numpy(), ordered["file_index"].to_numpy()
    # A batch ends where the file changes, at a gap in file_index (a filtered event), or after chunk_events.
    breaks = np.flatnonzero((names[1:] != names[:-1]) | (np.diff(index) != 1)) + 1
    for run in np.split(np.arange(len(index)), breaks):
        for lo in range(0, len(run), chunk_events):
            part = run[lo : lo + chunk_events]
            first, last = int(part[0]), int(part[-1])
            yield ReadBatch(names[first], int(index[first]), int(index[last]) + 1, records[first : last + 1])


@dataclass(frozen=True)
class FileInfo:
    path: Path
    n_frames: int
    frame_shape: tuple[int, int]


def check_files(events: pd.DataFrame, data_root: Path) -> dict[str, FileInfo]:
    """Open every referenced file once before writing anything, so bad data fails fast.

    Raises DataError for a path outside ``data_root``, a missing, corrupt or non-SEVIR file,
    a ``file_index`` out of range, an id that differs from the catalog's, or frame sizes that
    differ between files.
    """
    files: dict[str, FileInfo] = {}
    for file_name, rows in events.groupby("file_name", sort=True):
        path = sevir.safe_join(data_root, str(file_name))
        with sevir.VilFile(path) as vil:
            index = rows["file_index"].to_numpy()
            bad = (index < 0) | (index >= vil.n_events)
            if bad.any():
                raise DataError(f"{path}: catalog event {rows['id'].to_numpy()[bad][0]!r} has file_index {index[bad][0]}, "
                                f"but the file holds {vil.n_events} events; fix the catalog or rerun fetch")  # fmt: skip
            stored = np.asarray(vil.ids, dtype=object)[index]
            wrong = stored != rows["id"].to_numpy(dtype=object)
            if wrong.any():
                k = int(np.flatnonzero(wrong)[0])
                raise DataError(f"{path}: row {index[k]} holds event {stored[k]!r} but the catalog says {rows['id'].iloc[k]!r}; "
                                "the catalog does not match the file, rerun fetch")  # fmt: skip
            files[str(file_name)] = FileInfo(path, vil.n_frames, vil.frame_shape)
    shapes = {info.frame_shape for info in files.values()}
    if len(shapes) > 1:
        raise DataError(f"VIL files have different frame sizes {sorted(shapes)}; windows need one size, fix data.root")
    return files


def _catalog_events(raw_dir: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    catalog = sevir.read_catalog(raw_dir)
    is_vil = catalog["img_type"].astype(str).str.lower() == "vil"
    missing = int((is_vil & (pd.to_numeric(catalog["pct_missing"], errors="coerce") != 0)).sum())
    events = sevir.vil_rows(catalog)
    if events.empty:
        raise DataError(
            f"{raw_dir / sevir.CATALOG_NAME}: no VIL event with pct_missing == 0; check the catalog or rerun fetch"
        )
    dropped = {"events_dropped_missing": missing, "events_dropped_duplicate": int(is_vil.sum()) - missing - len(events)}
    return events, dropped


def split_events(events: pd.DataFrame, files: dict[str, FileInfo],
                 split: SplitConfig) -> tuple[pd.DataFrame, dict[str, int]]:  # fmt: skip
    """``events`` with a ``split`` column (:func:`assign_splits`, each event's frame count from its
    file), less the events straddling a boundary; and how many were dropped at each boundary."""
    n_frames = events["file_name"].map(lambda name: files[str(name)].n_frames)
    names = assign_splits(events["time_utc"], split, n_frames)
    counts = names.value_counts()
    dropped = {f"events_dropped_straddle_{b}": int(counts.get(name, 0)) for b, name in STRADDLES.items()}
    if any(dropped.values()):
        log.info("data.split: dropped %d event(s) whose frames straddle train_end (%s) and %d straddling val_end (%s), "
                 "so that no split's frames overlap the next one's", dropped["events_dropped_straddle_train_end"],
                 split.train_end, dropped["events_dropped_straddle_val_end"], split.val_end)  # fmt: skip
    events = events.assign(split=names)
    return events.loc[names.isin(SPLITS)].reset_index(drop=True), dropped


# ---------------------------------------------------------------------- the stage
def read_block(vil: sevir.VilFile, start: int, stop: int, out: np.ndarray) -> np.ndarray:
    """Events ``start:stop`` of ``vil`` as (n, H, W, T) uint8. Raises DataError on a corrupt or
    truncated file, as :meth:`sevir.VilFile.read`.

    A file stored as plain bytes (:meth:`sevir.VilFile.contiguous`, as SEVIR's are) is not copied:
    the events' pages are mapped read-only from the page cache (read from disk first when they are
    not there, in this call) and the array is a view of the mapping, unmapped when the last view
    of it is dropped. Otherwise (or where the file system cannot map files) they are read into
    the start of ``out``, a C-contiguous uint8 buffer at least that large (any shape), and
    returned as a view of it: reusing it saves faulting in a fresh 7 MB array per event.
    """
    n = stop - start
    if not 0 <= start < stop <= vil.n_events:
        raise DataError(
            f"{vil.path}: file_index {start}..{stop - 1} out of range (file holds {vil.n_events} events); fix the catalog"
        )
    shape = (n, *vil.vil.shape[1:])
    size = int(np.prod(shape))
    failed = f"{vil.path}: read of events {start}..{stop - 1} failed"
    fix = "the file is corrupt or truncated, delete it and rerun fetch"
    where = vil.contiguous()
    if where is not None:  # plain bytes in the file: no HDF5 machinery, and the GIL is released
        fd, offset = where
        first = offset + start * (size // n)  # the block's first byte in the file
        try:
            ends = os.fstat(fd).st_size
        except OSError as err:
            raise DataError(f"{failed} ({err}); {fix}") from None
        if ends < first + size:  # checked first: touching a mapped page past the end kills the process (SIGBUS)
            raise DataError(f"{failed} (file ends at byte {ends}, the events end at byte {first + size}); {fix}")
        mapped = _map(fd, first, size)
        if mapped is not None:
            return mapped.reshape(shape)
        block = out.reshape(-1)[:size].reshape(shape)
        view, done = memoryview(block.reshape(-1)), 0
        try:
            while done < size:
                got = os.preadv(fd, [view[done:]], first + done)
                if got == 0:
                    raise DataError(f"{failed} (file ends at byte {first + done}); {fix}")
                done += got
        except OSError as err:
            raise DataError(f"{failed} ({err}); {fix}") from None
        return block
    block = out.reshape(-1)[:size].reshape(shape)
    try:
        vil.vil.read_direct(block, source_sel=np.s_[start:stop], dest_sel=np.s_[0:n])
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"{failed} ({err}); {fix}") from None
    return block


def _map(fd: int, first: int, size: int) -> np.ndarray | None:
    """Bytes ``first .. first + size`` of ``fd`` mapped read-only, their pages faulted in now
    (MAP_POPULATE: read from disk here if they are not cached, so the reader, not the threads
    that use them, waits for the disk), as a flat uint8 array; None where mapping fails."""
    base = first - first % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(fd, first - base + size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ, offset=base)
    except (OSError, ValueError):
        return None
    return np.frombuffer(mapping, np.uint8, size, first - base)


def read_events(events: pd.DataFrame, files: dict[str, FileInfo], chunk_events: int,
                buffers: list[np.ndarray]) -> Iterator[tuple[ReadBatch, np.ndarray]]:  # fmt: skip
    """Stream ``(batch, vil)`` with ``vil`` (n, H, W, T) uint8, n <= chunk_events; one open file at a time.

    Batches are read into ``buffers`` in turn (flat uint8 arrays of chunk_events x H x W x T): a
    batch stays valid while the next ``len(buffers) - 1`` are read.

    No read-ahead of our own: the kernel's is enough for this sequential pass. Asking for the next
    event with posix_fadvise(WILLNEED) made a cold run ~30% slower here (and the reads after it).
    """
    vil: sevir.VilFile | None = None
    try:
        for k, batch in enumerate(plan_reads(events, chunk_events)):
            path = files[batch.file_name].path
            if vil is None or vil.path != path:
                if vil is not None:
                    vil.close()
                vil = sevir.VilFile(path)
            yield batch, read_block(vil, batch.start, batch.stop, buffers[k % len(buffers)])
    finally:
        if vil is not None:
            vil.close()


@dataclass(frozen=True)
class Grid:
    """Where an event's windows are, the same for every event of a file (same frame count)."""

    n_frames: int  # frames of an event in the file (before frame_step)
    starts: list[int]  # window starts, in kept frames of the event
    first: int  # first stored frame (kept frames)
    stop: int  # one past the last stored frame (kept frames)
    window_len: int
    frame_step: int = 1  # every frame_step-th frame of the event is kept; starts, first and stop count kept frames

    @classmethod
    def of(cls, n_frames: int, windows: WindowsConfig) -> Grid | None:
        step = windows.frame_step
        starts = window_starts(kept_frames(n_frames, step), windows.window_len, windows.stride, windows.long_len)
        if not starts:
            return None
        first, stop = stored_range(starts, windows.window_len, windows.long_len)
        return cls(n_frames, starts, first, stop, windows.window_len, step)

    @property
    def raw_slice(self) -> slice:
        """The event's original frames that are stored: ``first * step``, then every ``step``-th."""
        return slice(self.first * self.frame_step, (self.stop - 1) * self.frame_step + 1, self.frame_step)

    @property
    def frame_offset(self) -> int:
        """The original frame index of the first stored frame."""
        return self.first * self.frame_step

    @property
    def n_stored(self) -> int:
        return self.stop - self.first

    @property
    def stored_starts(self) -> list[int]:
        return [s - self.first for s in self.starts]


def prepare_events(stream: Iterator[tuple[ReadBatch, np.ndarray]], grids: dict[str, Grid], factor: int,
                   frame_shape: tuple[int, int], stats: dict[str, SplitStats], pool: ThreadPoolExecutor,
                   place: Callable[[Event, Grid], Callable[[np.ndarray], None]], workers: int = 2,
                   ) -> Iterator[tuple[Event, Grid]]:  # fmt: skip
    """``(event, grid)`` per streamed event, in stream order, once the event is written.

    Each event is one task in ``pool`` (``workers`` threads): its stored frames are downsampled,
    turned time-major into a frame buffer (frames a cache line apart, :func:`kernels.frame_buffer`),
    their window frames counted, and the frames handed to the writer that ``place(event, grid)``
    returned. ``place`` is called here, in stream order, so rows are assigned in that order
    whatever order the tasks finish in. Stats are added here too, in order, from each task's counts.

    Up to ``workers`` tasks run while the stream maps (or reads) the next batch: the transpose, the
    count, the write and the mapped read all run without the GIL (:mod:`pipeline.sevir.kernels`,
    ``os.pwrite``, MAP_POPULATE), so they overlap on as many cores as there are. A batch must stay
    valid while the next ``workers`` are read. ``workers + 1`` frame buffers rotate: no fresh
    pages are faulted in per event.
    """
    n_max = max(grid.n_stored for grid in grids.values())
    buffers = [kernels.frame_buffer(n_max, *frame_shape) for _ in range(workers + 1)]
    pending: collections.deque[tuple[Event, Future, Grid]] = collections.deque()

    def done() -> tuple[Event, Grid]:
        event, future, grid = pending.popleft()
        stats[event.split].add_counts(*future.result())
        return event, grid

    n = 0
    for batch, block in stream:  # block: (k, H, W, T) uint8
        grid = grids[batch.file_name]
        for raw, event in zip(block, batch.events, strict=True):
            # Event n's buffer was last used by event n - workers - 1, whose task is done.
            task = pool.submit(_prepare, raw, factor, grid, buffers[n % (workers + 1)], place(event, grid))
            pending.append((event, task, grid))
            n += 1
            if len(pending) > workers:
                yield done()
    while pending:
        yield done()


def _prepare(raw: np.ndarray, factor: int, grid: Grid, out: np.ndarray,
             write: Callable[[np.ndarray], None]) -> tuple[int, np.ndarray]:  # fmt: skip
    """One event's task: downsample, time-major into ``out``, count, ``write``; returns the counts."""
    kept = downsample(raw[:, :, grid.raw_slice], factor)  # (h, w, F), a view when factor is 1
    frames = to_time_major(kept, out=out[: grid.n_stored])  # (F, h, w)
    lo = grid.starts[0] - grid.first  # the windows' frames; long-clip-only frames are not counted
    counts = count_pixels(frames[lo : grid.starts[-1] + grid.window_len - grid.first])
    write(frames)
    return counts


def prepare_workers(windows: WindowsConfig) -> int:
    """Threads preparing and writing events: ``windows.workers``, or by default one per CPU, 2 to 4.

    The main thread only maps the next events (reading them from disk when they are not cached);
    a worker's task (transpose, count, write: ~5 ms at 384x384x49) runs without the GIL, so two
    workers keep two cores busy while the mapping overlaps them. One worker would leave the
    transform and the write one after the other."""
    if windows.workers is not None:
        return windows.workers
    return max(2, min(4, os.cpu_count() or 2))


# ------------------------------------------------------------- leftovers of killed runs
def _tmp_pattern(root: Path) -> re.Pattern[str]:
    # The names pipeline.sevir.atomic_dir gives its temporary siblings: .<name>.tmp-<8 hex digits>
    return re.compile(rf"\.{re.escape(root.name)}\.tmp-[0-9a-f]{{8}}")


def sweep_stale_tmp(root: Path) -> list[Path]:
    """Delete the temporary siblings of ``root`` (``.<name>.tmp-XXXXXXXX``) that a killed run left;
    return them. Call it only while no other run can be writing next to ``root`` (:func:`_claim`)."""
    if not root.parent.is_dir():
        return []
    pattern, removed = _tmp_pattern(root), []
    for path in sorted(root.parent.iterdir()):
        if not pattern.fullmatch(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.warning("removed %d temporary folder(s) left by an interrupted chunk run: %s",
                    len(removed), ", ".join(p.name for p in removed))  # fmt: skip
    return removed


@contextlib.contextmanager
def _claim(root: Path) -> Iterator[None]:
    """Hold a shared lock on ``root``'s parent folder for a run; first, if no other run holds it,
    sweep the leftovers of killed runs (the kernel drops a killed process's lock, so a leftover
    with no lock holder is stale, and one whose run is still going is never touched)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(root.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another chunk run is writing next to %s; leaving its temporary folders alone", root)
        except OSError as err:  # a file system without locks: no way to tell a live run from a dead one
            log.info("cannot lock %s (%s); not sweeping temporary folders", root.parent, err)
        else:
            sweep_stale_tmp(root)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH)  # from exclusive (or nothing) to shared: runs may overlap
        yield
    finally:
        os.close(fd)  # releases the lock


def write_windows(raw_dir: Path, windows: WindowsConfig, split: SplitConfig, stats_path: Path,
                  progress: bool = True) -> dict:  # fmt: skip
    """Catalog + VIL files in ``raw_dir`` -> ``windows.root``/{train,val,test}.h5 and ``stats_path``.

    Returns the stats also written to ``stats_path`` (JSON, flat numbers per split). On any
    error nothing is replaced: the previous ``windows.root`` and stats stay as they were.
    """
    with _claim(Path(windows.root)):
        return _write_windows(raw_dir, windows, split, stats_path, progress)


def _write_windows(raw_dir: Path, windows: WindowsConfig, split: SplitConfig, stats_path: Path,
                   progress: bool) -> dict:  # fmt: skip
    began = time.perf_counter()
    events, dropped = _catalog_events(raw_dir)
    files = check_files(events, sevir.data_root_of(raw_dir))
    events, straddling = split_events(events, files, split)
    dropped |= straddling
    raw_h, raw_w = next(iter(files.values())).frame_shape
    factor = windows.downsample
    if raw_h % factor or raw_w % factor:
        raise DataError(
            f"windows.downsample = {factor} does not divide the VIL frame size {raw_h}x{raw_w}; pick a divisor"
        )
    frame_shape = (raw_h // factor, raw_w // factor)

    # The window grid depends only on a file's frame count; events too short for one window are skipped.
    grids = {name: Grid.of(info.n_frames, windows) for name, info in files.items()}
    stats = {name: SplitStats() for name in SPLITS}
    short = events["file_name"].map(lambda name: grids[name] is None)
    for file_name, n in events.loc[short, "file_name"].value_counts().sort_index().items():
        info = files[str(file_name)]
        log.warning("%s: events have %d frames (%d at windows.frame_step = %d), fewer than one window (and its long "
                    "clip) needs (%d); skipping %d event(s)", info.path, info.n_frames,
                    kept_frames(info.n_frames, windows.frame_step), windows.frame_step, windows.long_len, n)  # fmt: skip
    for name, n in events.loc[short, "split"].value_counts().items():
        stats[str(name)].events_skipped_short = int(n)
    id_len = max(1, int(events["id"].astype(str).str.len().max())) if len(events) else 1  # none when all straddle
    events = events.loc[~short]
    grids = {name: grid for name, grid in grids.items() if grid is not None}
    # Every row holds as many frames as the longest stored range (all equal unless files differ in T).
    n_frames = max((grid.n_stored for grid in grids.values()), default=windows.long_len)
    n_events = events["split"].value_counts()
    raw_t = max(info.n_frames for info in files.values())

    bytes_read = 0
    with sevir.atomic_dir(windows.root) as tmp, ExitStack() as stack:
        writers = {
            name: SplitWriter(
                tmp / f"{name}.h5", name, windows, split, frame_shape, id_len, int(n_events.get(name, 0)), n_frames
            )  # fmt: skip
            for name in SPLITS
        }
        for writer in writers.values():
            stack.callback(writer.discard)  # on error; after a clean close it does nothing
        if grids:
            # Events of the last `workers` batches may still be prepared while the next is read into the
            # buffer of the batch before them (prepare_events keeps at most `workers` events pending);
            # only files that cannot be mapped (chunked, compressed) are read into these buffers.
            workers = prepare_workers(windows)
            read_buffers = [
                np.empty(windows.chunk_events * raw_h * raw_w * raw_t, np.uint8) for _ in range(workers + 1)
            ]
            stream = stack.enter_context(closing(read_events(events, files, windows.chunk_events, read_buffers)))
            bar = stack.enter_context(
                tqdm(total=len(events), unit="event", desc="chunk", disable=None if progress else True)
            )
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk-prepare"))

            def place(event: Event, grid: Grid) -> Callable[[np.ndarray], None]:
                writer = writers[event.split]
                row = writer.reserve(event.id, event.epoch_s, grid.frame_offset, grid.stored_starts)
                return functools.partial(writer.write_row, row)

            for event, grid in prepare_events(stream, grids, factor, frame_shape, stats, pool, place, workers):
                stats[event.split].events += 1
                stats[event.split].windows += len(grid.starts)
                bytes_read += grid.n_frames * raw_h * raw_w
                bar.set_postfix_str(
                    f"{bytes_read / max(bar.format_dict['elapsed'], 1e-9) / 1e6:.0f} MB/s", refresh=False
                )
                bar.update()
            bar.close()
        for writer in writers.values():
            writer.close()
        bytes_written = sum((tmp / f"{name}.h5").stat().st_size for name in SPLITS)
        result = {
            "frame_height": frame_shape[0], "frame_width": frame_shape[1], "window_len": windows.window_len,
            "long_len": windows.long_len, "downsample": factor, "frame_step": windows.frame_step,
            "frames_per_event": n_frames, **dropped,
            "bytes_read": bytes_read, "bytes_written": bytes_written,
            **{name: stats[name].as_metrics() for name in SPLITS},
        }  # fmt: skip
        with sevir.atomic_file(stats_path) as stats_tmp:
            stats_tmp.write_text(json.dumps(result, indent=2) + "\n")
    seconds = max(time.perf_counter() - began, 1e-9)
    log.info("chunk: %d windows (train %d, val %d, test %d) from %d events; read %.0f MB (%.0f MB/s), wrote %.0f MB in %.1f s",
             sum(s.windows for s in stats.values()), stats["train"].windows, stats["val"].windows, stats["test"].windows,
             len(events), bytes_read / 1e6, bytes_read / 1e6 / seconds, bytes_written / 1e6, seconds)  # fmt: skip
    return result
