"""Cut SEVIR VIL events into chronological train/val/test windows: the library behind stage chunk.

Output, one HDF5 file per split in ``windows.root`` (``train.h5``, ``val.h5``, ``test.h5``)::

    vil       (N, L, H, W) uint8 0-255   L = in_len + out_len; chunks (1, L, H, W): one window per read
    memory    (N, M, H, W) uint8 0-255   only when memory_len > L: the phase-1 long clip of M frames
                                         ending where the window's target ends; chunks (1, M, H, W)
    event_id  (N,) bytes                 SEVIR event id of each window
    start     (N,) int32                 frame offset of the window in its 49-frame event
    time_utc  (N,) int64                 the event's catalog time_utc, seconds since 1970-01-01 UTC
    attrs     split, in_len, out_len, stride, window_len (L), long_len (M; = L when memory_len is
              null), downsample, train_end, val_end, scale ("uint8 0-255; divide by 255"),
              time_utc_units

Window starts are 0, stride, 2*stride, ... while the window fits in the event's T frames, so an
event yields ``floor((T - L) / stride) + 1`` windows (T >= L). When ``memory_len`` M > L a window
is kept only if its long clip fits too (start >= M - L); the grid is not shifted, so the count is
``floor((T - L) / stride) - ceil((M - L) / stride) + 1``. :func:`window_starts` is the one rule.

Events are streamed: grouped by file, in ``file_index`` order, ``chunk_events`` at a time, so
memory stays at a few events whatever the file size. Everything is written into a temporary
directory that replaces ``windows.root`` only at the end (:func:`pipeline.sevir.atomic_dir`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
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

log = logging.getLogger("pipeline.windows")

SPLITS = ("train", "val", "test")
SCALE_NOTE = "uint8 0-255; divide by 255"
TIME_UNITS = "seconds since 1970-01-01 00:00:00 UTC"
# Coarse intensity bins for the stats: the standard VIL thresholds are the edges.
HIST_EDGES = (0, *sevir.VIL_THRESHOLDS, 256)
_TRANSPOSE_TILE = 2048  # pixels per tile in the H*W x T -> T x H*W transpose (~100 KB, stays in cache)


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


def assign_splits(times: pd.Series, split: SplitConfig) -> pd.Series:
    """``train`` for time <= train_end, ``val`` for train_end < time <= val_end, else ``test``."""
    train_end, val_end = _naive_utc(split.train_end), _naive_utc(split.val_end)
    names = np.where(times <= train_end, "train", np.where(times <= val_end, "val", "test"))
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


def to_time_major(event: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """One event from SEVIR's (H, W, T) layout to (T, H, W), the layout windows are read in.

    Copies tile by tile so each tile's source and destination stay in cache (about 1.5x
    faster than ``np.ascontiguousarray(event.transpose(2, 0, 1))`` at 384x384x49).
    """
    h, w, t = event.shape
    out = np.empty((t, h, w), dtype=event.dtype) if out is None else out
    src = np.ascontiguousarray(event).reshape(h * w, t)
    dst = out.reshape(t, h * w)
    for i in range(0, h * w, _TRANSPOSE_TILE):
        dst[:, i : i + _TRANSPOSE_TILE] = src[i : i + _TRANSPOSE_TILE].T
    return out


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
        self.pixels += frames.size
        for k, threshold in enumerate(sevir.VIL_THRESHOLDS):
            # count_nonzero on a bool mask: ~6x faster than np.bincount over all 256 values
            self.at_least[k] += np.count_nonzero(frames >= threshold)

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


# ---------------------------------------------------------------------- the writer
class SplitWriter:
    """One split's output file: resizable datasets, appended one event's windows at a time.

    ``capacity`` (the expected window count) presizes the datasets, so appending costs no
    resize per event; they grow if needed and are trimmed to the windows written on close.
    The small per-window records (event_id, start, time_utc) are kept in memory and written
    on close (28 bytes a window).
    """

    def __init__(self, path: Path, split: str, windows: WindowsConfig, splits: SplitConfig,
                 frame_shape: tuple[int, int], id_len: int, capacity: int = 0):  # fmt: skip
        self.path, self.split = path, split
        self.window_len, self.long_len = windows.window_len, windows.long_len
        h, w = frame_shape
        self.h5 = h5py.File(path, "w")
        self.h5.attrs.update({
            "split": split, "in_len": windows.in_len, "out_len": windows.out_len, "stride": windows.stride,
            "window_len": windows.window_len, "long_len": windows.long_len,
            "downsample": windows.downsample, "scale": SCALE_NOTE, "time_utc_units": TIME_UNITS,
            "train_end": str(splits.train_end), "val_end": str(splits.val_end),
        })  # fmt: skip
        L, M = self.window_len, self.long_len
        self.vil = self.h5.create_dataset(
            "vil", (capacity, L, h, w), np.uint8, maxshape=(None, L, h, w), chunks=(1, L, h, w)
        )
        self.vil.attrs["scale"] = SCALE_NOTE
        self.memory = None
        if M > L:  # otherwise the long clip is the window itself: stored once
            self.memory = self.h5.create_dataset(
                "memory", (capacity, M, h, w), np.uint8, maxshape=(None, M, h, w), chunks=(1, M, h, w)
            )
            self.memory.attrs["scale"] = SCALE_NOTE
        self.id_dtype = f"S{id_len}"
        self.event_ids: list[bytes] = []
        self.starts: list[int] = []
        self.times: list[int] = []
        self.n = 0

    def append(self, event_id: str, time_utc: int, frames: np.ndarray, starts: list[int]) -> None:
        """Write the windows starting at ``starts`` of one event, ``frames`` (T, H, W) uint8."""
        i0 = self.n
        self.n += len(starts)
        if self.n > self.vil.shape[0]:
            self._resize(max(self.n, 2 * self.vil.shape[0]))
        L, M = self.window_len, self.long_len
        # Each window is one whole, contiguous chunk: written straight from the event, no copy.
        for k, s in enumerate(starts):
            self.vil[i0 + k] = frames[s : s + L]
            if self.memory is not None:
                self.memory[i0 + k] = frames[s + L - M : s + L]
        self.event_ids += [event_id.encode()] * len(starts)
        self.starts += starts
        self.times += [time_utc] * len(starts)

    def _resize(self, n: int) -> None:
        for ds in (self.vil, self.memory):
            if ds is not None:
                ds.resize(n, axis=0)

    def close(self) -> None:
        """Trim to the windows written, write the per-window records, close the file."""
        if self.n == 0:
            log.warning("split %s is empty: %s holds 0 windows; check data.split against the catalog's time_utc range",
                        self.split, self.path.name)  # fmt: skip
        if self.vil.shape[0] != self.n:
            self._resize(self.n)
        for name, values in (
            ("event_id", np.array(self.event_ids, self.id_dtype)),
            ("start", np.array(self.starts, np.int32)),
            ("time_utc", np.array(self.times, np.int64)),
        ):
            self.h5.create_dataset(name, data=values, maxshape=(None,), chunks=(4096,))
        self.h5["time_utc"].attrs["units"] = TIME_UNITS
        self.h5.close()


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


def _catalog_events(raw_dir: Path, split: SplitConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    catalog = sevir.read_catalog(raw_dir)
    is_vil = catalog["img_type"].astype(str).str.lower() == "vil"
    missing = int((is_vil & (pd.to_numeric(catalog["pct_missing"], errors="coerce") != 0)).sum())
    events = sevir.vil_rows(catalog)
    if events.empty:
        raise DataError(
            f"{raw_dir / sevir.CATALOG_NAME}: no VIL event with pct_missing == 0; check the catalog or rerun fetch"
        )
    events["split"] = assign_splits(events["time_utc"], split)
    dropped = {"events_dropped_missing": missing, "events_dropped_duplicate": int(is_vil.sum()) - missing - len(events)}
    return events, dropped


# ---------------------------------------------------------------------- the stage
def read_events(
    events: pd.DataFrame, files: dict[str, FileInfo], chunk_events: int
) -> Iterator[tuple[ReadBatch, np.ndarray]]:
    """Stream ``(batch, vil)`` with ``vil`` (n, H, W, T) uint8, n <= chunk_events; one open file at a time."""
    vil: sevir.VilFile | None = None
    try:
        for batch in plan_reads(events, chunk_events):
            path = files[batch.file_name].path
            if vil is None or vil.path != path:
                if vil is not None:
                    vil.close()
                vil = sevir.VilFile(path)
            yield batch, vil.read(batch.start, batch.stop)
    finally:
        if vil is not None:
            vil.close()


def prepare_events(stream: Iterator[tuple[ReadBatch, np.ndarray]], starts_of: dict[str, list[int]], factor: int,
                   window_len: int, stats: dict[str, SplitStats], pool: ThreadPoolExecutor,
                   ) -> Iterator[tuple[Event, np.ndarray, list[int]]]:  # fmt: skip
    """``(event, frames, starts)`` per streamed event, ``frames`` (T, h, w) uint8 downsampled and
    time-major, its pixels counted into ``stats``; valid until the next item is requested.

    Event n+1 is prepared in ``pool`` while the caller writes event n: numpy releases the GIL
    in these copies and comparisons, so they overlap the h5py writes. Two buffers rotate.
    """
    buffers: list[np.ndarray | None] = [None, None]
    pending: tuple[Event, Future, list[int]] | None = None
    n = 0
    for batch, block in stream:  # block: (k, H, W, T) uint8
        starts = starts_of[batch.file_name]
        for raw, event in zip(block, batch.events, strict=True):
            h, w, t = raw.shape
            shape = (t, h // factor, w // factor)
            if buffers[n % 2] is None or buffers[n % 2].shape != shape:
                buffers[n % 2] = np.empty(shape, np.uint8)  # reused: no fresh pages to fault in per event
            future = pool.submit(_prepare, raw, factor, buffers[n % 2], stats[event.split], starts, window_len)
            n += 1
            if pending is not None:
                yield pending[0], pending[1].result(), pending[2]
            pending = (event, future, starts)
    if pending is not None:
        yield pending[0], pending[1].result(), pending[2]


def _prepare(raw: np.ndarray, factor: int, out: np.ndarray, split_stats: SplitStats, starts: list[int],
             window_len: int) -> np.ndarray:  # fmt: skip
    frames = to_time_major(downsample(raw, factor), out=out)  # (H, W, T) -> (T, h, w)
    split_stats.add_pixels(frames[starts[0] : starts[-1] + window_len])  # each covered frame once
    return frames


def write_windows(raw_dir: Path, windows: WindowsConfig, split: SplitConfig, stats_path: Path,
                  progress: bool = True) -> dict:  # fmt: skip
    """Catalog + VIL files in ``raw_dir`` -> ``windows.root``/{train,val,test}.h5 and ``stats_path``.

    Returns the stats also written to ``stats_path`` (JSON, flat numbers per split). On any
    error nothing is replaced: the previous ``windows.root`` and stats stay as they were.
    """
    began = time.perf_counter()
    events, dropped = _catalog_events(raw_dir, split)
    files = check_files(events, sevir.data_root_of(raw_dir))
    raw_h, raw_w = next(iter(files.values())).frame_shape
    factor = windows.downsample
    if raw_h % factor or raw_w % factor:
        raise DataError(
            f"windows.downsample = {factor} does not divide the VIL frame size {raw_h}x{raw_w}; pick a divisor"
        )
    frame_shape = (raw_h // factor, raw_w // factor)

    # The window grid depends only on a file's frame count; events too short for one window are skipped.
    starts_of = {
        name: window_starts(info.n_frames, windows.window_len, windows.stride, windows.long_len)
        for name, info in files.items()
    }
    stats = {name: SplitStats() for name in SPLITS}
    short = events["file_name"].map(lambda name: not starts_of[name])
    for file_name, n in events.loc[short, "file_name"].value_counts().sort_index().items():
        log.warning("%s: events have %d frames, fewer than one window (and its long clip) needs (%d); skipping %d event(s)",
                    files[str(file_name)].path, files[str(file_name)].n_frames, windows.long_len, n)  # fmt: skip
    for name, n in events.loc[short, "split"].value_counts().items():
        stats[str(name)].events_skipped_short = int(n)
    id_len = max(1, int(events["id"].astype(str).str.len().max()))
    events = events.loc[~short]

    bytes_read = 0
    with sevir.atomic_dir(windows.root) as tmp, ExitStack() as stack:
        expected = events.groupby("split")["file_name"].agg(lambda names: sum(len(starts_of[n]) for n in names))
        writers = {
            name: SplitWriter(tmp / f"{name}.h5", name, windows, split, frame_shape, id_len, int(expected.get(name, 0)))
            for name in SPLITS
        }
        for writer in writers.values():
            stack.callback(writer.h5.close)  # on error; a clean run closes (and warns on empty) below
        stream = stack.enter_context(closing(read_events(events, files, windows.chunk_events)))
        bar = stack.enter_context(
            tqdm(total=len(events), unit="event", desc="chunk", disable=None if progress else True)
        )
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-prepare"))
        for event, frames, starts in prepare_events(stream, starts_of, factor, windows.window_len, stats, pool):
            writers[event.split].append(event.id, event.epoch_s, frames, starts)
            stats[event.split].events += 1
            stats[event.split].windows += len(starts)
            bytes_read += frames.shape[0] * raw_h * raw_w
            bar.set_postfix_str(f"{bytes_read / max(bar.format_dict['elapsed'], 1e-9) / 1e6:.0f} MB/s", refresh=False)
            bar.update()
        bar.close()
        for writer in writers.values():
            writer.close()
        bytes_written = sum((tmp / f"{name}.h5").stat().st_size for name in SPLITS)
        result = {
            "frame_height": frame_shape[0], "frame_width": frame_shape[1], "window_len": windows.window_len,
            "long_len": windows.long_len, "downsample": factor, **dropped,
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
