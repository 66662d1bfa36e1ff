"""WindowDataset / make_loader over windows files (written here by hand in chunk's layout)."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.sevir.dataset import WindowDataset, make_loader, to_unit

IN, OUT, H, W = 13, 12, 8, 8
L = IN + OUT
E, F, STARTS = 3, 37, (0, 12)  # 3 events of 37 stored frames, windows at frames 0 and 12 of each
N = E * len(STARTS)


def write_windows_file(path: Path, vil: np.ndarray, starts: tuple[int, ...] = STARTS, in_len: int = IN,
                       window_len: int = L, long_len: int | None = None) -> Path:  # fmt: skip
    """A split file as stage chunk writes it: vil (E, F, H, W) uint8, one row per event, the
    per-event records and the window index (every event gets windows at ``starts``)."""
    n_events = len(vil)
    with h5py.File(path, "w") as f:
        f.create_dataset("vil", data=vil, chunks=(1, 1, *vil.shape[2:]), maxshape=(None, *vil.shape[1:]))
        f.create_dataset("event_id", data=np.array([f"S{i}".encode() for i in range(n_events)]))
        f.create_dataset("time_utc", data=1000 * np.arange(n_events, dtype=np.int64))
        f.create_dataset("frame_offset", data=np.full(n_events, 2, np.int32))
        f.create_dataset("window_event", data=np.repeat(np.arange(n_events, dtype=np.int32), len(starts)))
        f.create_dataset("window_start", data=np.tile(np.array(starts, np.int32), n_events))
        f.attrs.update(in_len=in_len, out_len=window_len - in_len, stride=12, window_len=window_len,
                       long_len=long_len or window_len, downsample=1, scale="uint8 0-255; divide by 255")  # fmt: skip
    return path


@pytest.fixture
def vil() -> np.ndarray:
    # Event e, frame f holds the value 100 * e + f everywhere: easy to tell apart.
    values = 100 * np.arange(E)[:, None] + np.arange(F)[None, :]
    return np.broadcast_to(values[:, :, None, None], (E, F, H, W)).astype(np.uint8)


def window(vil: np.ndarray, i: int) -> np.ndarray:
    """The (L, H, W) frames of window i: event i // 2, from frame STARTS[i % 2]."""
    start = STARTS[i % len(STARTS)]
    return vil[i // len(STARTS), start : start + L]


def first_value(i: int) -> int:
    return 100 * (i // len(STARTS)) + STARTS[i % len(STARTS)]


@pytest.fixture
def path(tmp_path, vil) -> Path:
    return write_windows_file(tmp_path / "train.h5", vil)


def test_items_are_float32_on_the_unit_scale_shaped_time_channel_height_width(path, vil):
    item = WindowDataset(path)[3]
    assert item["inputs"].shape == (IN, 1, H, W) and item["targets"].shape == (OUT, 1, H, W)
    assert item["inputs"].dtype == torch.float32
    torch.testing.assert_close(item["inputs"][:, 0], torch.from_numpy(window(vil, 3)[:IN]).float() / 255)
    torch.testing.assert_close(item["targets"][:, 0], torch.from_numpy(window(vil, 3)[IN:]).float() / 255)


def test_raw_items_are_uint8_and_to_unit_gives_the_float_items(path):
    raw, unit = WindowDataset(path, raw=True)[1], WindowDataset(path)[1]
    assert raw["inputs"].dtype == torch.uint8
    torch.testing.assert_close(to_unit(raw["targets"]), unit["targets"])


def test_len_is_the_number_of_windows(path):
    assert len(WindowDataset(path)) == N


def test_every_window_is_its_slice_of_the_stored_event(path, vil):
    ds = WindowDataset(path, raw=True)
    for i in range(N):
        item = ds[i]
        np.testing.assert_array_equal(torch.cat([item["inputs"], item["targets"]])[:, 0].numpy(), window(vil, i))


def test_memory_is_the_window_itself_when_the_long_clip_is_the_window(path, vil):
    item = WindowDataset(path, with_memory=True, raw=True)[3]
    assert item["memory"].shape == (L, 1, H, W)
    torch.testing.assert_close(item["memory"][:, 0], torch.from_numpy(window(vil, 3)))


def test_memory_is_the_long_clip_ending_with_the_window(tmp_path):
    vil = np.random.default_rng(0).integers(0, 256, (2, 49, H, W), dtype=np.uint8)
    ds = WindowDataset(write_windows_file(tmp_path / "m.h5", vil, starts=(12, 24), long_len=37),
                       with_memory=True, raw=True)  # fmt: skip
    assert ds.long_len == 37
    item = ds[3]  # event 1, window at frame 24: its clip is frames 12..48
    torch.testing.assert_close(item["memory"][:, 0], torch.from_numpy(vil[1, 12:49]))
    torch.testing.assert_close(item["inputs"][:, 0], torch.from_numpy(vil[1, 24 : 24 + IN]))
    torch.testing.assert_close(item["targets"][:, 0], torch.from_numpy(vil[1, 24 + IN : 49]))


def test_no_memory_key_unless_asked(path):
    assert set(WindowDataset(path)[0]) == {"inputs", "targets"}


def test_shorter_lengths_are_cut_around_the_stored_forecast_origin(path, vil):
    item = WindowDataset(path, in_len=4, out_len=6, raw=True)[1]
    torch.testing.assert_close(item["inputs"][:, 0], torch.from_numpy(window(vil, 1)[IN - 4 : IN]))
    torch.testing.assert_close(item["targets"][:, 0], torch.from_numpy(window(vil, 1)[IN : IN + 6]))


def test_a_longer_target_moves_the_origin_only_as_far_as_needed(path, vil):
    item = WindowDataset(path, in_len=5, out_len=20, raw=True)[1]  # origin 13 -> 5
    torch.testing.assert_close(item["inputs"][:, 0], torch.from_numpy(window(vil, 1)[:5]))
    torch.testing.assert_close(item["targets"][:, 0], torch.from_numpy(window(vil, 1)[5:]))


def test_lengths_beyond_the_stored_window_are_a_clear_error(path):
    with pytest.raises(DataError, match="does not fit the stored 25-frame windows"):
        WindowDataset(path, in_len=13, out_len=24)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="windows file not found; run the chunk stage"):
        WindowDataset(tmp_path / "nope.h5")


def test_a_file_in_the_old_window_per_row_layout_is_a_clear_error(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.create_dataset("vil", data=np.zeros((2, L, H, W), np.uint8))
        f.attrs.update(in_len=IN, window_len=L, long_len=L)
    with pytest.raises(DataError, match=r"no window index \(an older chunk layout\); rerun the chunk stage"):
        WindowDataset(tmp_path / "old.h5")


def test_a_window_index_pointing_outside_the_events_is_a_clear_error(tmp_path, vil):
    path = write_windows_file(tmp_path / "bad.h5", vil, starts=(0, 13))  # 13 + 25 > 37 frames
    with pytest.raises(DataError, match="window index does not fit"):
        WindowDataset(path)


def test_an_index_past_the_end_raises_index_error(path):
    with pytest.raises(IndexError):
        WindowDataset(path)[N]


def test_the_file_is_not_opened_until_the_first_item(path):
    ds = WindowDataset(path)
    assert ds._h5 is None
    copy = pickle.loads(pickle.dumps(ds))
    assert len(copy) == N and copy._h5 is None


def test_a_used_dataset_still_pickles_and_the_copy_reopens(path, vil):
    ds = WindowDataset(path, raw=True)
    ds[0]
    assert ds._h5 is not None
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._h5 is None
    torch.testing.assert_close(copy[5]["inputs"][:, 0], torch.from_numpy(window(vil, 5)[:IN]))


def test_info_names_the_event_and_its_frame_offset(path):
    # window 3 = event 1 at stored frame 12; the stored frames start at frame 2 of the event
    assert WindowDataset(path).info(3) == {"event_id": "S1", "start": 14, "time_utc": 1000}


def first_values(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["inputs"][:, 0, 0, 0, 0].tolist()


ALL = sorted(first_value(i) for i in range(N))


def test_a_loader_with_two_workers_yields_every_window_once(path):
    loader = make_loader(path, batch_size=2, shuffle=True, num_workers=2, raw=True)
    batches = list(loader)
    assert batches[0]["inputs"].shape == (2, IN, 1, H, W) and batches[0]["targets"].shape == (2, OUT, 1, H, W)
    assert sorted(v for b in batches for v in first_values(b)) == ALL


@pytest.mark.slow  # each spawned worker imports torch afresh (seconds)
def test_a_loader_with_spawned_workers_works(path):
    loader = make_loader(
        path, batch_size=3, num_workers=2, raw=True, multiprocessing_context="spawn", persistent_workers=False
    )
    assert sorted(v for b in loader for v in first_values(b)) == ALL


def test_a_handle_opened_in_another_process_is_not_reused(path):
    ds = WindowDataset(path)
    ds[0]
    inherited = ds._h5
    ds._pid = -1  # as a forked worker sees its parent's handle
    ds[0]
    assert ds._h5 is not inherited


def test_forked_workers_work_after_the_parent_read_an_item(path):
    ds = WindowDataset(path, raw=True)
    ds[0]  # the parent now holds an open handle; workers must not share it
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    assert sorted(v for b in loader for v in first_values(b)) == ALL


def test_distributed_loaders_give_each_rank_a_disjoint_shard(path):
    shards = [
        [
            v
            for b in make_loader(path, batch_size=1, distributed=True, num_replicas=2, rank=r, raw=True)
            for v in first_values(b)
        ]
        for r in (0, 1)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == ALL


def test_pin_memory_follows_cuda_availability(path):
    assert make_loader(path, batch_size=2).pin_memory == torch.cuda.is_available()
