"""The chronological split by each event's whole frame span: no frame of a split is as late as a
frame of the next split; events straddling a boundary are dropped and counted."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import config as config_mod
from pipeline import sevir
from pipeline.config import SplitConfig, WindowsConfig
from pipeline.sevir import synthetic, windows
from tests.test_chunk import FILE_2018, FILE_2019, SIZE, catalog_row, write_vil_file

REPO = Path(__file__).resolve().parents[1]
SPLIT = SplitConfig(train_end=dt.datetime(2019, 1, 1), val_end=dt.datetime(2019, 6, 1))

# (id, time_utc, split at 49 frames; None = straddles a boundary). time_utc is an event's middle frame.
EVENTS = {
    FILE_2018: [
        ("S1", "2018-06-01 10:00:00", "train"),
        ("S2", "2018-12-31 21:55:00", "train"),  # last frame 23:55
        ("S3", "2018-12-31 22:00:00", None),  # last frame on train_end
        ("S4", "2018-12-31 23:00:00", None),
        ("S5", "2019-01-01 00:00:00", None),  # the old rule's last train event
        ("S6", "2019-01-01 01:55:00", None),  # first frame 23:55 the day before
        ("S7", "2019-01-01 02:00:00", "val"),  # first frame on train_end
    ],
    FILE_2019: [
        ("S8", "2019-03-01 12:00:00", "val"),
        ("R9", "2019-05-31 21:55:00", "val"),
        ("R10", "2019-06-01 00:00:00", None),
        ("S11", "2019-06-01 00:05:00", None),
        ("S12", "2019-06-01 02:00:00", "test"),
        ("R13", "2019-09-17 19:54:00", "test"),
    ],
}


def make_root(root: Path, frames: int = 49) -> dict[str, np.ndarray]:
    """A SEVIR-format root holding :data:`EVENTS`; returns their frames by id."""
    rng = np.random.default_rng(0)
    rows, vil_of = [], {}
    for file_name, events in EVENTS.items():
        vil = rng.integers(0, 256, (len(events), SIZE, SIZE, frames), dtype=np.uint8)
        write_vil_file(root / file_name, [e for e, _, _ in events], vil)
        for index, (event_id, time_utc, _) in enumerate(events):
            rows.append(catalog_row(event_id, file_name, index, time_utc))
            vil_of[event_id] = vil[index]
    pd.DataFrame(rows, columns=sevir.CATALOG_COLUMNS).to_csv(root / sevir.CATALOG_NAME, index=False)
    return vil_of


def run(tmp_path: Path, frames: int = 49, **knobs) -> dict:
    make_root(tmp_path / "raw", frames)
    cfg = WindowsConfig(root=tmp_path / "windows", **knobs)
    return windows.write_windows(tmp_path / "raw", cfg, SPLIT, stats_path=tmp_path / "stats.json", progress=False)


def stored_frame_times(path: Path, frames: int = 49) -> tuple[set[str], np.ndarray]:
    """Event ids of a split file and the times of every frame its windows and long clips hold,
    from the stored time_utc, frame_offset, window_start and frame_step (frame t of an event of
    T frames is at time_utc + (t - (T - 1) // 2) * 5 min)."""
    with h5py.File(path, "r") as f:
        step, L, M = (int(f.attrs[k]) for k in ("frame_step", "window_len", "long_len"))
        ids = {i.decode() for i in f["event_id"][()]}
        times, offsets = f["time_utc"][()], f["frame_offset"][()]
        out = []
        for row, start in zip(f["window_event"][()], f["window_start"][()], strict=True):
            kept = np.arange(start + L - M, start + L)  # kept frames of the row
            original = offsets[row] + step * kept  # frames of the original event
            out.append(times[row] + (original - (frames - 1) // 2) * 60 * sevir.FRAME_MINUTES)
    return ids, np.concatenate(out) if out else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- the rule
def test_the_frame_span_of_a_49_frame_event_is_time_utc_plus_minus_120_minutes():
    times = pd.Series(pd.to_datetime(["2019-01-01 12:00:00"]))
    first, last = windows.frame_span(times, 49)
    assert first[0] == pd.Timestamp("2019-01-01 10:00:00") and last[0] == pd.Timestamp("2019-01-01 14:00:00")
    first, last = windows.frame_span(times, pd.Series([25]))  # 25 frames: -60 .. +60 min
    assert first[0] == pd.Timestamp("2019-01-01 11:00:00") and last[0] == pd.Timestamp("2019-01-01 13:00:00")


def test_events_are_assigned_by_their_whole_frame_span():
    rows = [e for events in EVENTS.values() for e in events]
    names = windows.assign_splits(pd.Series(pd.to_datetime([t for _, t, _ in rows])), SPLIT, 49)
    straddles = {"S3", "S4", "S5", "S6"}  # straddle train_end; R10 and S11 straddle val_end
    expected = [s or windows.STRADDLES["train_end" if i in straddles else "val_end"] for i, _, s in rows]
    assert names.tolist() == expected


def test_the_frame_count_sets_the_span():
    # 13 frames: -30 .. +30 min, so an event 1 h before train_end is train and one 1 h after is val
    times = pd.Series(pd.to_datetime(["2018-12-31 23:00:00", "2019-01-01 01:00:00", "2019-01-01 00:00:00"]))
    assert windows.assign_splits(times, SPLIT, 13).tolist() == ["train", "val", "straddles_train_end"]
    assert windows.assign_splits(times, SPLIT, 49).tolist() == ["straddles_train_end"] * 3


# --------------------------------------------------------------------------- the stage
def test_events_straddling_a_boundary_are_dropped_and_counted(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.sevir.windows"):
        stats = run(tmp_path)
    for split in windows.SPLITS:
        ids, _ = stored_frame_times(tmp_path / "windows" / f"{split}.h5")
        assert ids == {i for events in EVENTS.values() for i, _, s in events if s == split}
        assert stats[split]["events"] == len(ids)
    assert stats["events_dropped_straddle_train_end"] == 4 and stats["events_dropped_straddle_val_end"] == 2
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["events_dropped_straddle_train_end"] == 4 and saved["events_dropped_straddle_val_end"] == 2
    assert "dropped 4 event(s) whose frames straddle train_end" in caplog.text
    assert "2 straddling val_end" in caplog.text


@pytest.mark.parametrize("knobs", [{}, {"frame_step": 2, "in_len": 7, "out_len": 6, "stride": 6}],
                         ids=["5-min", "frame_step-2"])  # fmt: skip
def test_no_frame_of_a_split_is_as_late_as_a_frame_of_the_next(tmp_path, knobs):
    run(tmp_path, **knobs)
    train, val, test = (stored_frame_times(tmp_path / "windows" / f"{s}.h5")[1] for s in windows.SPLITS)
    assert len(train) and len(val) and len(test)
    assert train.max() < val.min() and val.max() < test.min()
    train_end, val_end = (int(pd.Timestamp(t).timestamp()) for t in (SPLIT.train_end, SPLIT.val_end))
    assert train.max() < train_end <= val.min() and val.max() < val_end <= test.min()


def test_the_span_comes_from_the_files_frame_count(tmp_path):
    stats = run(tmp_path, frames=13, in_len=4, out_len=3, stride=3)  # 13 frames: -30 .. +30 min
    assert stats["events_dropped_straddle_train_end"] == 1  # S5 (00:00); S3, S4 now end and S6 starts in time
    assert stats["train"]["events"] == 4 and stats["val"]["events"] == 4
    assert stats["events_dropped_straddle_val_end"] == 2  # R10 and S11


def test_an_event_straddling_both_boundaries_is_counted_once(tmp_path):
    make_root(tmp_path / "raw")
    narrow = SplitConfig(train_end=dt.datetime(2018, 6, 1, 9), val_end=dt.datetime(2018, 6, 1, 11))
    cfg = WindowsConfig(root=tmp_path / "windows")
    stats = windows.write_windows(tmp_path / "raw", cfg, narrow, stats_path=tmp_path / "stats.json", progress=False)
    assert stats["events_dropped_straddle_train_end"] == 1  # S1 (10:00) straddles both; counted once
    assert stats["train"]["events"] == 0 and stats["val"]["events"] == 0 and stats["test"]["events"] == 12


# ------------------------------------------------------------------ the embedded sample
def test_the_embedded_sample_fills_every_split_under_the_default_params():
    cfg = config_mod.load(REPO / "params.yaml")
    planned = synthetic.plan_events(cfg.data.synthetic, cfg.data.seed)
    times = pd.Series([event.time_utc for event in planned])
    names = windows.assign_splits(times, cfg.data.split, cfg.data.synthetic.frames)
    counts = names.value_counts()
    assert all(counts.get(split, 0) > 0 for split in windows.SPLITS)
