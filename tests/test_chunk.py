"""Stage chunk: SEVIR events -> chronological train/val/test window files + stats.

Every test builds its own tiny SEVIR-format root (CATALOG.csv + vil/YYYY/*.h5, 12x12 frames).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import chunk, sevir
from pipeline.cli import run_stage
from pipeline.config import SplitConfig, WindowsConfig
from pipeline.errors import DataError
from pipeline.sevir import windows
from pipeline.sevir.dataset import WindowDataset

SIZE = 12
REPO = Path(__file__).resolve().parents[1]
SPLIT = SplitConfig(train_end=dt.datetime(2019, 1, 1), val_end=dt.datetime(2019, 6, 1))
FILE_2018 = "vil/2018/SEVIR_VIL_STORMEVENTS_2018_0101_1231.h5"
FILE_2019 = "vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_1231.h5"


# ------------------------------------------------------------------ a tiny SEVIR root
def catalog_row(event_id: str, file_name: str, file_index: int, time_utc: str, pct_missing: float = 0.0,
                img_type: str = "vil") -> dict:  # fmt: skip
    row = dict.fromkeys(sevir.CATALOG_COLUMNS, 0)
    row.update(id=event_id, file_name=file_name, file_index=file_index, img_type=img_type, time_utc=time_utc,
               minute_offsets="-120:-115", event_type="Hail", proj=sevir.PROJ, pct_missing=pct_missing)  # fmt: skip
    return row


def write_vil_file(path: Path, ids: list[str], vil: np.ndarray) -> None:
    """A SEVIR VIL file: ``id`` (N,) bytes and ``vil`` (N, H, W, T) uint8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("id", data=np.array([i.encode() for i in ids]))
        f.create_dataset("vil", data=vil)


@dataclass
class Sample:
    raw: Path
    vil: dict[str, np.ndarray] = field(default_factory=dict)  # event id -> (H, W, T)
    expected: dict[str, set[str]] = field(default_factory=dict)  # split -> event ids


def make_sample(root: Path, frames: int = 49, seed: int = 0, frames_2019: int | None = None) -> Sample:
    """Two files, nine usable VIL events across the three splits (four with their last frame just
    before a boundary or their first frame on it; time_utc is an event's middle frame), plus rows
    chunk must drop: another image type, pct_missing > 0, a duplicated id. The 2019 file's events
    have ``frames_2019`` frames (default: ``frames``)."""
    rng = np.random.default_rng(seed)
    sample = Sample(raw=root)
    files = {
        # file_name: [(id, time_utc), ...] in file order; "X..." rows are dropped by the catalog filter
        # S4 and R7 end at 23:55 before a boundary, S5 and S8 start on one (at 49 frames: time_utc -/+ 120 min)
        FILE_2018: [("S1", "2018-03-01 10:00:00"), ("X1", "2018-04-01 10:00:00"), ("S2", "2018-05-01 10:00:00"),
                    ("S3", "2018-12-31 21:00:00"), ("S4", "2018-12-31 21:55:00"), ("S5", "2019-01-01 02:00:00")],
        FILE_2019: [("S6", "2019-03-01 12:00:00"), ("R7", "2019-05-31 21:55:00"), ("S8", "2019-06-01 02:00:00"),
                    ("X2", "2019-07-01 00:00:00"), ("R9", "2019-09-17 19:54:00")],
    }  # fmt: skip
    rows = []
    for file_name, events in files.items():
        n_frames = frames_2019 if frames_2019 and file_name == FILE_2019 else frames
        vil = rng.integers(0, 256, (len(events), SIZE, SIZE, n_frames), dtype=np.uint8)
        vil[:, : SIZE // 2] //= 8  # some low values, so thresholds are not all ~50%
        write_vil_file(root / file_name, [e for e, _ in events], vil)
        for index, (event_id, time_utc) in enumerate(events):
            missing = 0.25 if event_id.startswith("X") else 0.0
            rows.append(catalog_row(event_id, file_name, index, time_utc, pct_missing=missing))
            rows.append(catalog_row(event_id, file_name.replace("vil", "ir069"), index, time_utc, img_type="ir069"))
            if not event_id.startswith("X"):
                sample.vil[event_id] = vil[index]
    rows.append(catalog_row("S2", FILE_2019, 3, "2019-07-01 00:00:00"))  # duplicate id: the first row wins
    pd.DataFrame(rows, columns=sevir.CATALOG_COLUMNS).to_csv(root / sevir.CATALOG_NAME, index=False)
    sample.expected = {"train": {"S1", "S2", "S3", "S4"}, "val": {"S5", "S6", "R7"}, "test": {"S8", "R9"}}
    return sample


@pytest.fixture
def sample(tmp_path: Path) -> Sample:
    return make_sample(tmp_path / "raw")


def run(sample: Sample, tmp_path: Path, **knobs) -> dict:
    cfg = WindowsConfig(root=tmp_path / "windows", **knobs)
    return windows.write_windows(
        sample.raw, cfg, SPLIT, stats_path=tmp_path / "reports/chunk_stats.json", progress=False
    )


def read_split(tmp_path: Path, split: str) -> dict[str, np.ndarray]:
    with h5py.File(tmp_path / "windows" / f"{split}.h5", "r") as f:
        return {name: f[name][()] for name in f} | {"attrs": dict(f.attrs)}


def split_windows(out: dict[str, np.ndarray]) -> list[tuple[str, int, np.ndarray]]:
    """(event id, start in the original event, (L, H, W) frames) of every window of a split file."""
    L = int(out["attrs"]["window_len"])
    result = []
    for row, start in zip(out["window_event"], out["window_start"], strict=True):
        event_id = out["event_id"][row].decode()
        result.append((event_id, int(out["frame_offset"][row] + start), out["vil"][row, start : start + L]))
    return result


def window_ids(out: dict[str, np.ndarray]) -> list[str]:
    return [out["event_id"][row].decode() for row in out["window_event"]]


def expected_count(frames: int, window: int, stride: int, long: int) -> int:
    """The documented formula, written independently of window_starts."""
    if frames < long:
        return 0
    return max(0, (frames - window) // stride - math.ceil((long - window) / stride) + 1)


# ------------------------------------------------------------------------ the grid
@pytest.mark.parametrize(
    ("frames", "in_len", "out_len", "stride", "memory_len"),
    [(49, 13, 12, 12, None), (49, 13, 12, 6, None), (49, 5, 5, 10, None), (49, 12, 24, 12, None),
     (49, 13, 12, 12, 37), (49, 13, 12, 5, 30), (49, 13, 12, 12, 49), (25, 13, 12, 1, None), (20, 13, 12, 12, None)],
)  # fmt: skip
def test_window_starts_follow_the_count_formula(frames, in_len, out_len, stride, memory_len):
    window = in_len + out_len
    long = memory_len or window
    starts = windows.window_starts(frames, window, stride, long)
    assert len(starts) == expected_count(frames, window, stride, long)
    assert all(s % stride == 0 and s >= long - window and s + window <= frames for s in starts)


def test_default_windows_start_at_0_12_24():
    assert windows.window_starts(49, 25, 12) == [0, 12, 24]


@pytest.mark.parametrize(
    ("frames", "in_len", "out_len", "stride", "memory_len", "stored"),
    [(49, 13, 12, 12, None, (0, 49)), (49, 13, 12, 20, None, (0, 45)), (49, 13, 12, 12, 37, (0, 49)),
     (49, 4, 4, 16, 20, (4, 40)), (37, 13, 12, 12, None, (0, 37))],
)  # fmt: skip
def test_the_stored_frames_run_from_the_first_long_clip_to_the_last_window_end(frames, in_len, out_len, stride,
                                                                                memory_len, stored):  # fmt: skip
    grid = windows.Grid.of(frames, WindowsConfig(in_len=in_len, out_len=out_len, stride=stride, memory_len=memory_len))
    assert (grid.first, grid.stop) == stored
    assert all(0 <= s + grid.window_len - (memory_len or grid.window_len) for s in grid.stored_starts)
    assert grid.stored_starts[-1] + grid.window_len == grid.n_stored


@pytest.mark.parametrize(
    "knobs",
    [dict(in_len=13, out_len=12, stride=12), dict(in_len=13, out_len=12, stride=6), dict(in_len=4, out_len=4, stride=16),
     dict(in_len=13, out_len=12, stride=12, memory_len=37), dict(in_len=10, out_len=10, stride=7, memory_len=30)],
    ids=["13-12-s12", "13-12-s6", "4-4-s16", "13-12-s12-m37", "10-10-s7-m30"],
)  # fmt: skip
def test_every_event_gives_the_formula_count_of_windows(sample, tmp_path, knobs):
    stats = run(sample, tmp_path, **knobs)
    cfg = WindowsConfig(**knobs)
    per_event = expected_count(49, cfg.window_len, cfg.stride, cfg.long_len)
    for split, ids in sample.expected.items():
        out = read_split(tmp_path, split)
        assert pd.Series(window_ids(out)).value_counts().to_dict() == dict.fromkeys(ids, per_event)
        assert len(out["window_start"]) == per_event * len(ids) == stats[split]["windows"]
        assert out["vil"].shape == (len(ids), stats["frames_per_event"], SIZE, SIZE)  # each event once


def test_windows_hold_the_event_frames_in_time_order(sample, tmp_path):
    run(sample, tmp_path)
    found = split_windows(read_split(tmp_path, "val"))
    assert sorted((event_id, start) for event_id, start, _ in found) == [
        (event_id, start) for event_id in sorted(sample.expected["val"]) for start in (0, 12, 24)
    ]
    for event_id, start, window in found:
        event = sample.vil[event_id]  # (H, W, T)
        np.testing.assert_array_equal(window, event[:, :, start : start + 25].transpose(2, 0, 1))


@pytest.mark.parametrize(("in_len", "out_len", "stride", "memory_len"), [(13, 12, 12, 37), (4, 4, 16, 20)])
def test_memory_clip_is_the_long_clip_ending_with_the_target(sample, tmp_path, in_len, out_len, stride, memory_len):
    run(sample, tmp_path, in_len=in_len, out_len=out_len, stride=stride, memory_len=memory_len)
    L, M = in_len + out_len, memory_len
    out = read_split(tmp_path, "train")
    assert "memory" not in out  # the long clip is read from the event's row: no second copy
    assert {start for _, start, _ in split_windows(out)} == set(windows.window_starts(49, L, stride, M))
    for row, start in zip(out["window_event"], out["window_start"], strict=True):
        event = sample.vil[out["event_id"][row].decode()]
        first = out["frame_offset"][row] + start + L - M  # in the original event
        np.testing.assert_array_equal(out["vil"][row, start + L - M : start + L],
                                      event[:, :, first : first + M].transpose(2, 0, 1))  # fmt: skip


# --------------------------------------------------------------- frame_step (SEVIR-LR)
@pytest.mark.parametrize(
    ("frames", "step", "in_len", "out_len", "stride", "memory_len", "count"),
    [(49, 2, 7, 6, 12, None, 2), (49, 2, 7, 6, 6, None, 3), (49, 2, 7, 6, 1, None, 13), (49, 2, 13, 12, 12, None, 1),
     (49, 3, 7, 6, 2, None, 3), (48, 2, 7, 6, 6, None, 2), (49, 2, 7, 6, 6, 19, 2), (49, 1, 7, 6, 6, None, 7)],
)  # fmt: skip
def test_window_count_covers_frame_step(frames, step, in_len, out_len, stride, memory_len, count):
    kept = (frames - 1) // step + 1  # frames 0, step, 2*step, ... of the event
    assert windows.kept_frames(frames, step) == kept == len(range(0, frames, step))
    long = memory_len or in_len + out_len
    assert expected_count(kept, in_len + out_len, stride, long) == count
    cfg = WindowsConfig(in_len=in_len, out_len=out_len, stride=stride, memory_len=memory_len, frame_step=step)
    grid = windows.Grid.of(frames, cfg)
    assert len(grid.starts) == count
    assert grid.raw_slice.step == step and grid.frame_offset == grid.first * step


def test_frame_step_2_windows_hold_every_second_frame(sample, tmp_path):
    """SEVIR-LR: 10-minute frames, 7 in -> 6 out; 25 kept frames per 49-frame event, stride 6 -> 3 windows."""
    stats = run(sample, tmp_path, in_len=7, out_len=6, stride=6, frame_step=2)
    assert stats["frames_per_event"] == 25 and stats["frame_step"] == 2
    for split, ids in sample.expected.items():
        out = read_split(tmp_path, split)
        assert out["attrs"]["frame_step"] == 2 and out["attrs"]["frame_minutes"] == 10
        assert stats[split]["windows"] == len(out["window_start"]) == 3 * len(ids)
        found = []
        for row, start in zip(out["window_event"], out["window_start"], strict=True):
            event_id = out["event_id"][row].decode()
            first = int(out["frame_offset"][row]) + 2 * int(start)  # in the original event
            found.append((event_id, first))
            expected = sample.vil[event_id][:, :, first : first + 2 * 13 : 2].transpose(2, 0, 1)
            np.testing.assert_array_equal(out["vil"][row, start : start + 13], expected)
        assert sorted(found) == [(e, s) for e in sorted(ids) for s in (0, 12, 24)]
    dataset = WindowDataset(tmp_path / "windows" / "val.h5")
    assert dataset[0]["inputs"].shape[0] == 7 and dataset[0]["targets"].shape[0] == 6
    assert [dataset.info(i)["start"] for i in range(3)] == [0, 12, 24]


def test_frame_step_2_stats_count_the_kept_frames_only(sample, tmp_path):
    stats = run(sample, tmp_path, in_len=7, out_len=6, stride=12, frame_step=2)  # windows at kept 0 and 12: 25 kept
    pixels = np.stack([sample.vil[e][:, :, 0:49:2] for e in sorted(sample.expected["test"])])
    assert stats["test"]["exceed_133"] == pytest.approx(np.mean(pixels >= 133), abs=1e-6)


def test_windows_longer_than_the_kept_frames_are_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exceeds the 25 frames a SEVIR event has at windows.frame_step = 2"):
        WindowsConfig(in_len=13, out_len=13, frame_step=2)


def test_each_event_is_stored_once_so_writes_equal_reads(sample, tmp_path):
    stats = run(sample, tmp_path)
    rows = sum(read_split(tmp_path, s)["vil"].shape[0] for s in windows.SPLITS)
    assert rows == len(sample.vil) and stats["frames_per_event"] == 49
    stored = sum(read_split(tmp_path, s)["vil"].nbytes for s in windows.SPLITS)
    assert stored == stats["bytes_read"]  # the windows overlap, yet no frame is written twice


def test_file_records_the_window_parameters_and_scale(sample, tmp_path):
    run(sample, tmp_path, in_len=10, out_len=8, stride=4)
    attrs = read_split(tmp_path, "test")["attrs"]
    assert (attrs["in_len"], attrs["out_len"], attrs["stride"], attrs["downsample"]) == (10, 8, 4, 1)
    assert (attrs["window_len"], attrs["long_len"]) == (18, 18)
    assert attrs["scale"] == "uint8 0-255; divide by 255"


def test_vil_is_chunked_one_frame_per_chunk(sample, tmp_path):
    run(sample, tmp_path)
    with h5py.File(tmp_path / "windows/train.h5") as f:
        assert f["vil"].dtype == np.uint8
        assert f["vil"].chunks == (1, 1, SIZE, SIZE)
        assert f["vil"].compression is None
        assert {name: f[name].dtype for name in ("window_event", "window_start", "frame_offset", "time_utc")} == {
            "window_event": np.int32, "window_start": np.int32, "frame_offset": np.int32, "time_utc": np.int64,
        }  # fmt: skip


def test_time_utc_is_stored_as_epoch_seconds(sample, tmp_path):
    run(sample, tmp_path)
    out = read_split(tmp_path, "test")
    when = {e.decode(): t for e, t in zip(out["event_id"], out["time_utc"], strict=True)}
    assert when["R9"] == int(dt.datetime(2019, 9, 17, 19, 54, tzinfo=dt.UTC).timestamp())


def test_events_of_a_file_with_fewer_frames_fill_the_start_of_their_rows(tmp_path):
    sample = make_sample(tmp_path / "raw", frames_2019=37)  # 2018: 49 frames, 3 windows; 2019: 37, 2 windows
    stats = run(sample, tmp_path)
    assert stats["frames_per_event"] == 49
    out = read_split(tmp_path, "test")  # S8, R9: from the 2019 file
    assert sorted(window_ids(out)) == ["R9", "R9", "S8", "S8"]
    for event_id, start, window in split_windows(out):
        np.testing.assert_array_equal(window, sample.vil[event_id][:, :, start : start + 25].transpose(2, 0, 1))
    assert not out["vil"][:, 37:].any()  # the unused tail of the rows
    ds = WindowDataset(tmp_path / "windows/test.h5", raw=True)
    np.testing.assert_array_equal(ds[1]["targets"][:, 0].numpy(), out["vil"][out["window_event"][1], 25:37])


def test_stored_windows_load_through_the_dataset(sample, tmp_path):
    run(sample, tmp_path)
    item = WindowDataset(tmp_path / "windows/val.h5")[0]
    assert item["inputs"].shape == (13, 1, SIZE, SIZE) and item["targets"].shape == (12, 1, SIZE, SIZE)


# ---------------------------------------------------------------------- the splits
def test_splits_follow_the_time_boundaries_inclusively(sample, tmp_path):
    run(sample, tmp_path)
    for split, ids in sample.expected.items():
        out = read_split(tmp_path, split)
        assert {i.decode() for i in out["event_id"]} == set(window_ids(out)) == ids


def test_no_event_lands_in_two_splits(sample, tmp_path):
    run(sample, tmp_path, stride=1)
    seen = [set(window_ids(read_split(tmp_path, s))) for s in windows.SPLITS]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_rows_with_missing_data_or_another_image_type_are_dropped(sample, tmp_path):
    stats = run(sample, tmp_path)
    written = set().union(*(window_ids(read_split(tmp_path, s)) for s in windows.SPLITS))
    assert written == set(sample.vil)  # no X* (pct_missing 0.25), ir069 rows never become windows
    assert stats["events_dropped_missing"] == 2


def test_a_duplicated_event_id_is_kept_once(sample, tmp_path):
    stats = run(sample, tmp_path)
    train = read_split(tmp_path, "train")
    assert [i.decode() for i in train["event_id"]].count("S2") == 1  # its first row only (2018)
    assert window_ids(train).count("S2") == 3  # the 2019 duplicate is dropped
    assert stats["events_dropped_duplicate"] == 1


def test_an_empty_split_still_gets_a_file_and_a_warning(sample, tmp_path, caplog):
    cfg = WindowsConfig(root=tmp_path / "windows")
    late = SplitConfig(train_end=dt.datetime(2030, 1, 1), val_end=dt.datetime(2031, 1, 1))
    windows.write_windows(sample.raw, cfg, late, stats_path=tmp_path / "stats.json", progress=False)
    out = read_split(tmp_path, "val")
    assert out["vil"].shape == (0, 49, SIZE, SIZE) and out["window_event"].shape == (0,)
    assert len(WindowDataset(tmp_path / "windows/val.h5")) == 0
    assert "split val is empty" in caplog.text and "split test is empty" in caplog.text


# --------------------------------------------------------------------- downsampling
def reference_area_mean(frames: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, T) -> block means rounded half up, one block at a time."""
    h, w, t = frames.shape
    out = np.zeros((h // factor, w // factor, t), np.uint8)
    for i in range(h // factor):
        for j in range(w // factor):
            block = frames[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor].astype(np.float64)
            out[i, j] = np.floor(block.mean(axis=(0, 1)) + 0.5)
    return out


@pytest.mark.parametrize("factor", [2, 3, 4, 6])
def test_downsampling_is_the_rounded_area_mean(factor):
    frames = np.random.default_rng(factor).integers(0, 256, (12, 12, 5), dtype=np.uint8)
    frames[:2, :2, 0] = [[0, 1], [0, 0]] if factor == 2 else frames[:2, :2, 0]  # a 0.25 mean
    frames[:2, :2, 1] = [[1, 1], [0, 0]] if factor == 2 else frames[:2, :2, 1]  # a 0.5 tie -> rounds up
    np.testing.assert_array_equal(windows.downsample(frames, factor), reference_area_mean(frames, factor))


@pytest.mark.parametrize("factor", [6, 16, 17])  # 17: block sums past 65535 need a wider accumulator
def test_downsampling_does_not_overflow_at_255(factor):
    frames = np.full((2 * factor, 2 * factor, 3), 255, np.uint8)
    np.testing.assert_array_equal(windows.downsample(frames, factor), np.full((2, 2, 3), 255, np.uint8))


def test_downsampled_windows_are_the_area_mean_of_the_event(sample, tmp_path):
    run(sample, tmp_path, downsample=3, stride=20)  # stored frames 0..44 of each event
    out = read_split(tmp_path, "test")
    assert out["vil"].shape[1:] == (45, 4, 4)
    for event_id, start, window in split_windows(out):
        small = reference_area_mean(sample.vil[event_id], 3)
        np.testing.assert_array_equal(window, small[:, :, start : start + 25].transpose(2, 0, 1))


def test_a_frame_size_not_divisible_by_downsample_is_a_clear_error(sample, tmp_path):
    with pytest.raises(DataError, match="downsample = 5 does not divide the VIL frame size 12x12"):
        run(sample, tmp_path, downsample=5)
    assert not (tmp_path / "windows").exists()


def test_a_writer_stores_events_as_rows_and_the_window_index(tmp_path):
    frames = np.arange(49 * 4 * 4, dtype=np.uint32).astype(np.uint8).reshape(49, 4, 4)
    writer = windows.SplitWriter(tmp_path / "w.h5", "train", WindowsConfig(), SPLIT, (4, 4), 2, n_events=2, n_frames=49)
    writer.append("S1", 7, 0, frames, [0, 12, 24])
    writer.append("S2", 8, 0, frames[::-1].copy(), [0, 12, 24])
    with pytest.raises(RuntimeError, match="more events than the 2"):
        writer.append("S3", 9, 0, frames, [0])
    writer.close()
    with h5py.File(tmp_path / "w.h5") as f:
        assert f["vil"].shape == (2, 49, 4, 4) and f["event_id"][()].tolist() == [b"S1", b"S2"]
        assert f["window_event"][()].tolist() == [0, 0, 0, 1, 1, 1] and f["time_utc"][()].tolist() == [7, 8]
        np.testing.assert_array_equal(f["vil"][1], frames[::-1])


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_a_writers_file_does_not_depend_on_the_order_rows_are_written_in(tmp_path):
    """Chunks are allocated when the file is made, so rows written by several threads in any
    order give the same bytes as rows written one after another."""
    rows = np.random.default_rng(0).integers(0, 256, (6, 49, 4, 4), dtype=np.uint8)

    def write(path: Path, order: list[int], threads: int) -> None:
        writer = windows.SplitWriter(path, "train", WindowsConfig(), SPLIT, (4, 4), 2, n_events=6, n_frames=49)
        assert [writer.reserve(f"S{i}", i, 0, [0, 12, 24]) for i in range(6)] == list(range(6))
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda row: writer.write_row(row, rows[row]), order))
        writer.close()

    write(tmp_path / "in_order.h5", [0, 1, 2, 3, 4, 5], 1)
    write(tmp_path / "any_order.h5", [5, 2, 4, 0, 3, 1], 3)
    assert sha1(tmp_path / "in_order.h5") == sha1(tmp_path / "any_order.h5")
    with h5py.File(tmp_path / "any_order.h5") as f:
        np.testing.assert_array_equal(f["vil"][()], rows)
        assert f["event_id"][()].tolist() == [f"S{i}".encode() for i in range(6)]


def test_a_short_write_goes_on_where_it_stopped(tmp_path, monkeypatch):
    real, calls = os.pwrite, []

    def five_bytes_at_a_time(fd, data, offset):
        calls.append(offset)
        return real(fd, memoryview(data)[:5], offset)

    data = np.arange(64, dtype=np.uint8)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        monkeypatch.setattr(windows.os, "pwrite", five_bytes_at_a_time)
        windows._pwrite_all(fd, data, 100)
    finally:
        os.close(fd)
    assert len(calls) == 13 and (tmp_path / "f").read_bytes()[100:] == data.tobytes()


def test_time_major_copy_matches_the_numpy_transpose():
    event = np.random.default_rng(1).integers(0, 256, (70, 50, 9), dtype=np.uint8)  # H*W not a multiple of the tile
    np.testing.assert_array_equal(windows.to_time_major(event), event.transpose(2, 0, 1))
    part = event[:, :, 2:7]  # a strided view, as the stage passes the stored frame range
    np.testing.assert_array_equal(windows.to_time_major(part, out=np.empty((5, 70, 50), np.uint8)),
                                  part.transpose(2, 0, 1))  # fmt: skip


# ------------------------------------------------------------------------ streaming
def test_reads_at_most_chunk_events_events_per_call_in_file_order(sample, tmp_path, monkeypatch):
    calls: list[tuple[str, int, int]] = []
    buffers: set[int] = set()
    real_read = windows.read_block

    def spy(vil, start, stop, out):
        block = real_read(vil, start, stop, out)
        calls.append((vil.path.name, start, start + len(block)))
        buffers.add(out.ctypes.data)
        return block

    monkeypatch.setattr(windows, "read_block", spy)
    run(sample, tmp_path, chunk_events=2, workers=1)
    assert calls and max(stop - start for _, start, stop in calls) <= 2
    assert calls == sorted(calls)  # grouped by file, file_index increasing: one sequential pass
    assert sum(stop - start for _, start, stop in calls) == len(sample.vil)  # each kept event read once
    assert len(buffers) == 2 < len(calls)  # into workers + 1 reused buffers: memory does not grow with the file


@pytest.mark.parametrize("workers", [2, 3])
def test_more_workers_write_the_same_files_and_stats(sample, tmp_path, workers):
    one = run(sample, tmp_path / "one", workers=1)
    many = run(sample, tmp_path / "many", workers=workers)
    assert {k: v for k, v in one.items() if k != "bytes_written"} == {
        k: v for k, v in many.items() if k != "bytes_written"
    }
    for split in windows.SPLITS:
        a, b = read_split(tmp_path / "one", split), read_split(tmp_path / "many", split)
        for name in ("vil", "event_id", "frame_offset", "window_event", "window_start"):
            np.testing.assert_array_equal(a[name], b[name])
        assert sha1(tmp_path / f"one/windows/{split}.h5") == sha1(tmp_path / f"many/windows/{split}.h5")


def test_plain_bytes_and_hdf5_reads_agree(sample, tmp_path):
    """SEVIR files are contiguous: events are read with pread. A chunked (or compressed) file goes
    through h5py; both give the same windows."""
    plain = run(sample, tmp_path / "plain")
    with sevir.VilFile(sample.raw / FILE_2019) as f:
        assert f.contiguous() is not None
    for name in (FILE_2018, FILE_2019):
        path = sample.raw / name
        with h5py.File(path, "r") as f:
            ids, vil = f["id"][()], f["vil"][()]
        with h5py.File(path, "w") as f:
            f.create_dataset("id", data=ids)
            f.create_dataset("vil", data=vil, chunks=(1, SIZE, SIZE, vil.shape[3]), compression="gzip")
    with sevir.VilFile(sample.raw / FILE_2019) as f:
        assert f.contiguous() is None
    chunked = run(sample, tmp_path / "chunked")
    assert {k: v for k, v in plain.items() if k != "bytes_written"} == {
        k: v for k, v in chunked.items() if k != "bytes_written"
    }
    for split in windows.SPLITS:
        np.testing.assert_array_equal(
            read_split(tmp_path / "plain", split)["vil"], read_split(tmp_path / "chunked", split)["vil"]
        )


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps (Linux)")
def test_plain_files_are_mapped_not_copied_and_unmapped_after_the_run(sample, tmp_path, monkeypatch):
    seen = []
    real_read = windows.read_block

    def spy(vil, start, stop, out):
        block = real_read(vil, start, stop, out)
        in_buffer = out.ctypes.data <= block.ctypes.data < out.ctypes.data + out.nbytes
        seen.append((in_buffer, block.flags.writeable, vil.path, start, block.copy()))
        return block

    monkeypatch.setattr(windows, "read_block", spy)
    run(sample, tmp_path, chunk_events=2)
    assert seen and not any(in_buffer or writeable for in_buffer, writeable, *_ in seen)  # views of the file's pages
    for _, _, path, start, block in seen:
        with h5py.File(path) as f:
            np.testing.assert_array_equal(block, f["vil"][start : start + len(block)])
    assert str(sample.raw) not in Path("/proc/self/maps").read_text()  # every mapping is gone


def test_a_file_system_that_cannot_map_files_is_read_instead(sample, tmp_path, monkeypatch):
    mapped = run(sample, tmp_path / "mapped")

    def refuse(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(windows.mmap, "mmap", refuse)
    read = run(sample, tmp_path / "read")
    assert read == mapped
    for split in windows.SPLITS:
        assert sha1(tmp_path / f"mapped/windows/{split}.h5") == sha1(tmp_path / f"read/windows/{split}.h5")


def test_a_plain_file_cut_short_is_one_clear_error(sample, tmp_path):
    path = sample.raw / FILE_2019
    with sevir.VilFile(path) as f:
        offset = f.contiguous()[1]
        cut = offset + f.vil.nbytes // 2
    with open(path, "r+b") as f:  # keep the header (h5py still opens it), lose the second half of the events
        f.truncate(cut)
    with pytest.raises(DataError, match="corrupt or truncated"):
        run(sample, tmp_path)


def test_a_plain_file_cut_short_after_it_was_opened_is_an_error_not_a_crash(sample):
    """Mapped pages past the end of a file kill the process (SIGBUS): the size is checked first."""
    path = sample.raw / FILE_2019
    with sevir.VilFile(path) as vil:
        offset = vil.contiguous()[1]
        os.truncate(path, offset + vil.vil.nbytes // 2)
        with pytest.raises(
            DataError, match=r"file ends at byte \d+, the events end at byte \d+\); the file is corrupt"
        ):
            windows.read_block(vil, 0, vil.n_events, np.empty(vil.vil.nbytes, np.uint8))
        np.testing.assert_array_equal(windows.read_block(vil, 0, 1, np.empty(0, np.uint8))[0], sample.vil["S6"])


def test_a_file_index_gap_splits_a_read(sample, tmp_path, monkeypatch):
    calls: list[tuple[int, int]] = []
    real_read = windows.read_block
    monkeypatch.setattr(
        windows,
        "read_block",
        lambda vil, start, stop, out: calls.append((start, stop)) or real_read(vil, start, stop, out),
    )
    run(sample, tmp_path, chunk_events=10)
    assert (0, 1) in calls and (2, 6) in calls  # file 2018: index 1 (pct_missing) is never read


# ------------------------------------------------------------------------ the stats
def test_stats_count_events_windows_and_exceedance_per_split(sample, tmp_path):
    stats = run(sample, tmp_path)
    saved = json.loads((tmp_path / "reports/chunk_stats.json").read_text())
    assert saved == stats
    for split, ids in sample.expected.items():
        pixels = np.concatenate([sample.vil[i].ravel() for i in sorted(ids)])  # default windows cover all 49 frames
        assert stats[split]["events"] == len(ids) and stats[split]["windows"] == 3 * len(ids)
        assert stats[split]["exceed_74"] == pytest.approx(np.mean(pixels >= 74), abs=1e-6)
        assert stats[split]["hist_0_16"] == pytest.approx(np.mean(pixels < 16), abs=1e-6)
        assert sum(v for k, v in stats[split].items() if k.startswith("hist_")) == pytest.approx(1.0, abs=1e-5)
    assert (stats["frame_height"], stats["frame_width"]) == (SIZE, SIZE)
    assert stats["bytes_read"] == len(sample.vil) * SIZE * SIZE * 49
    assert stats["bytes_written"] == sum((tmp_path / f"windows/{s}.h5").stat().st_size for s in windows.SPLITS)


def test_stats_count_the_window_frames_only(sample, tmp_path):
    stats = run(sample, tmp_path, in_len=4, out_len=4, stride=16, memory_len=20)  # windows 16..23, 32..39
    pixels = np.concatenate([sample.vil[i][:, :, 16:40].ravel() for i in sorted(sample.expected["val"])])
    assert stats["val"]["exceed_133"] == pytest.approx(np.mean(pixels >= 133), abs=1e-6)


def test_events_shorter_than_a_window_are_skipped_and_counted(tmp_path, caplog):
    sample = make_sample(tmp_path / "raw", frames=20)
    stats = run(sample, tmp_path)
    assert stats["train"]["events_skipped_short"] == 4 and stats["train"]["windows"] == 0
    assert "fewer than one window" in caplog.text


# ------------------------------------------------------------------ the entrypoint
@pytest.fixture
def stage(sample, tmp_path, write_params):
    """Run ``python -m pipeline.chunk`` in-process; returns (exit code, stderr)."""
    params = write_params({"data": {"root": str(sample.raw), "split": {"train_end": "2019-01-01 00:00:00"}},
                           "windows": {"root": str(tmp_path / "windows")}})  # fmt: skip

    def _run(capsys) -> tuple[int, str]:
        code = run_stage(chunk.main, ["--params", str(params), "--stats", str(tmp_path / "reports/chunk_stats.json")])
        return code, capsys.readouterr().err

    return _run


def snapshot(tmp_path: Path) -> dict[str, str]:
    """Digest of every file in the stage's outputs and of the output folder's siblings."""
    files = [
        p for p in sorted((tmp_path / "windows").rglob("*")) + sorted((tmp_path / "reports").rglob("*")) if p.is_file()
    ]
    return {str(p.relative_to(tmp_path)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files} | {
        "siblings": ",".join(sorted(p.name for p in tmp_path.iterdir()))
    }


def test_stage_writes_three_split_files_and_the_stats(stage, tmp_path, capsys):
    code, _ = stage(capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "windows").iterdir()) == ["test.h5", "train.h5", "val.h5"]
    assert json.loads((tmp_path / "reports/chunk_stats.json").read_text())["train"]["windows"] == 12


def test_file_names_resolve_against_SOURCE_ROOT(tmp_path, write_params, capsys):
    source = make_sample(tmp_path / "sevir")  # the real SEVIR tree, used in place
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / sevir.CATALOG_NAME).write_bytes((source.raw / sevir.CATALOG_NAME).read_bytes())
    (raw / sevir.SOURCE_ROOT_NAME).write_text(f"{source.raw}\n")
    stats = windows.write_windows(
        raw, WindowsConfig(root=tmp_path / "windows"), SPLIT, tmp_path / "s.json", progress=False
    )
    assert stats["test"]["windows"] == 6


def break_catalog(sample: Sample) -> None:
    (sample.raw / sevir.CATALOG_NAME).unlink()


def break_file_missing(sample: Sample) -> None:
    (sample.raw / FILE_2019).unlink()


def break_file_truncated(sample: Sample) -> None:
    path = sample.raw / FILE_2019
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def break_file_corrupt(sample: Sample) -> None:
    (sample.raw / FILE_2019).write_bytes(b"this is not an HDF5 file" * 100)


def break_path_traversal(sample: Sample) -> None:
    catalog = pd.read_csv(sample.raw / sevir.CATALOG_NAME)
    catalog.loc[catalog["id"] == "R9", "file_name"] = "../../etc/passwd"
    catalog.to_csv(sample.raw / sevir.CATALOG_NAME, index=False)


def break_id_mismatch(sample: Sample) -> None:
    catalog = pd.read_csv(sample.raw / sevir.CATALOG_NAME)
    catalog.loc[(catalog["id"] == "R9") & (catalog["img_type"] == "vil"), "file_index"] = 0
    catalog.to_csv(sample.raw / sevir.CATALOG_NAME, index=False)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [(break_catalog, "catalog not found"), (break_file_missing, "VIL file referenced by the catalog is missing"),
     (break_file_truncated, "corrupt or truncated"), (break_file_corrupt, "corrupt or truncated"),
     (break_path_traversal, "escapes the data root"), (break_id_mismatch, "holds event 'S6' but the catalog says 'R9'")],
    ids=["missing-catalog", "missing-file", "truncated-file", "corrupt-file", "path-traversal", "id-mismatch"],
)  # fmt: skip
def test_bad_data_is_one_line_error_and_keeps_the_previous_output(stage, sample, tmp_path, capsys, breakage, message):
    assert stage(capsys)[0] == 0
    before = snapshot(tmp_path)
    breakage(sample)
    code, err = stage(capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # other lines: the usual logs
    assert len(errors) == 1 and message in errors[0] and err.endswith(errors[0] + "\n")
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_a_read_failing_midway_keeps_the_previous_output(stage, tmp_path, capsys, monkeypatch):
    assert stage(capsys)[0] == 0
    before = snapshot(tmp_path)
    real_read, calls = windows.read_block, []

    def failing(vil, start, stop, out):
        calls.append(start)
        if len(calls) == 4:
            raise DataError(
                f"{vil.path}: read of events {start}..{stop} failed (simulated); the file is corrupt or truncated"
            )
        return real_read(vil, start, stop, out)

    monkeypatch.setattr(windows, "read_block", failing)
    code, err = stage(capsys)
    assert code == 2 and "simulated" in err
    assert snapshot(tmp_path) == before


def test_a_full_disk_is_one_clear_error_and_keeps_the_previous_output(stage, tmp_path, capsys, monkeypatch):
    assert stage(capsys)[0] == 0
    before = snapshot(tmp_path)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(windows, "_pwrite_all", full)
    code, err = stage(capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "cannot write the windows ([Errno 28] No space left on device); free space under" in errors[0]
    assert "or point windows.root elsewhere" in errors[0]
    assert snapshot(tmp_path) == before


def test_a_failure_on_a_first_run_leaves_no_output(sample, tmp_path):
    break_file_truncated(sample)
    with pytest.raises(DataError):
        run(sample, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


# ---------------------------------------------------------------- leftovers of killed runs
def test_a_run_removes_the_temporary_folders_a_killed_run_left(sample, tmp_path, caplog):
    stale = [tmp_path / ".windows.tmp-0123abcd", tmp_path / ".windows.tmp-deadbeef"]  # atomic_dir's names
    stale[0].mkdir()
    (stale[0] / "train.h5").write_bytes(b"half written")
    stale[1].mkdir()
    others = [tmp_path / n for n in (".windows.tmp-xyz", ".windows.tmp-0123abcde", ".windowsx.tmp-0123abcd",
                                      "windows.tmp-0123abcd", ".other.tmp-0123abcd", ".windows.tmp-0123ABCD")]  # fmt: skip
    for path in others:
        path.mkdir()
    run(sample, tmp_path)
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in others)  # only the exact pattern is touched
    assert "removed 2 temporary folder(s) left by an interrupted chunk run" in caplog.text
    assert sorted(p.name for p in (tmp_path / "windows").iterdir()) == ["test.h5", "train.h5", "val.h5"]


def test_a_killed_run_leaves_a_temporary_folder_that_the_next_run_removes(sample, tmp_path):
    cfg = WindowsConfig(root=tmp_path / "windows")
    code = (
        "import os, signal, sys, datetime as dt\n"
        "from pathlib import Path\n"
        "from pipeline.sevir import windows\n"
        "from pipeline.config import SplitConfig, WindowsConfig\n"
        "real = windows.SplitWriter.write_row\n"
        "def write_row(self, *a):\n"
        "    real(self, *a)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "windows.SplitWriter.write_row = write_row\n"
        f"windows.write_windows(Path({str(sample.raw)!r}), WindowsConfig(root=Path({str(cfg.root)!r})), "
        "SplitConfig(), Path(sys.argv[1]), progress=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.json")], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".windows.tmp-")]
    assert len(left) == 1 and (left[0] / "train.h5").is_file()
    run(sample, tmp_path)
    assert not left[0].exists()


def test_a_run_leaves_the_temporary_folders_of_a_run_still_going_alone(sample, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.sevir.windows")
    live = tmp_path / ".windows.tmp-0123abcd"
    live.mkdir()
    fd = os.open(tmp_path, os.O_RDONLY)  # what a run in progress holds: a shared lock on the parent
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        run(sample, tmp_path)
    finally:
        os.close(fd)
    assert live.is_dir()
    assert "another chunk run is writing next to" in caplog.text
