"""The per-pixel kernels of stage chunk (pipeline.sevir.kernels) against plain numpy."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline import sevir
from pipeline.sevir import kernels


def reference_counts(values: np.ndarray, thresholds) -> list[int]:
    return [int(np.count_nonzero(values >= t)) for t in thresholds]


def test_counts_every_byte_value_in_every_byte_position_for_every_threshold():
    # Each of the 256 values sits in each of the 8 byte lanes of a word, next to every other lane value:
    # a carry or a lane mix-up in the word arithmetic shows up as a wrong count.
    values = np.arange(256, dtype=np.uint8)
    words = np.stack([np.roll(values, k) for k in range(8)], axis=1).reshape(-1)  # 2048 bytes
    words = np.concatenate([words, words[::-1], np.repeat(values, 9)])
    aligned = np.empty(words.size + 8, np.uint8)[:-8]  # np.empty is 8-byte aligned
    aligned[:] = words
    thresholds = list(range(1, 256))
    np.testing.assert_array_equal(kernels.count_at_least(aligned, thresholds), reference_counts(aligned, thresholds))


@pytest.mark.parametrize("offset", range(8))
@pytest.mark.parametrize("size", [0, 1, 7, 8, 15, 255 * 8, 255 * 8 + 3, 4099])
def test_counts_unaligned_and_ragged_sizes(offset, size):
    rng = np.random.default_rng(size * 8 + offset)
    buffer = rng.integers(0, 256, size + offset, dtype=np.uint8)
    values = buffer[offset:]  # starts `offset` bytes past an aligned address
    thresholds = sevir.VIL_THRESHOLDS
    np.testing.assert_array_equal(kernels.count_at_least(values, thresholds), reference_counts(values, thresholds))


def test_counts_vil_like_frames_and_non_contiguous_input():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (7, 96, 80), dtype=np.uint8)
    frames[frames < 140] = 0  # mostly dry, like VIL
    frames[0] = 255  # long runs of one value overflow a byte lane if lanes are not folded
    np.testing.assert_array_equal(kernels.count_at_least(frames, sevir.VIL_THRESHOLDS),
                                  reference_counts(frames, sevir.VIL_THRESHOLDS))  # fmt: skip
    strided = frames[:, ::3]
    np.testing.assert_array_equal(kernels.count_at_least(strided, sevir.VIL_THRESHOLDS),
                                  reference_counts(strided, sevir.VIL_THRESHOLDS))  # fmt: skip


@pytest.mark.parametrize("shape", [(7, 96, 80), (1, 96, 80), (5, 70, 50)])  # 70 x 50: frames not whole words
def test_counts_frames_that_lie_apart_where_they_are(shape):
    frames = kernels.frame_buffer(*shape)
    frames.base[...] = 255  # the pads between frames: counted, they would show
    frames[...] = np.random.default_rng(6).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(kernels.count_at_least(frames, sevir.VIL_THRESHOLDS),
                                  reference_counts(frames, sevir.VIL_THRESHOLDS))  # fmt: skip
    np.testing.assert_array_equal(kernels.count_at_least(frames[1:], sevir.VIL_THRESHOLDS),
                                  reference_counts(frames[1:], sevir.VIL_THRESHOLDS))  # fmt: skip


def test_counts_more_thresholds_than_one_kernel_call_holds():
    values = np.random.default_rng(4).integers(0, 256, 10_001, dtype=np.uint8)
    thresholds = [200, 1, 16, 128, 129, 255, 74, 74, 3]  # unsorted, repeated, 9 > 6
    np.testing.assert_array_equal(kernels.count_at_least(values, thresholds), reference_counts(values, thresholds))


def test_rejects_other_dtypes_and_thresholds_outside_uint8():
    with pytest.raises(TypeError, match="uint8"):
        kernels.count_at_least(np.zeros(8, np.int16), [1])
    with pytest.raises(ValueError, match="1..255"):
        kernels.count_at_least(np.zeros(8, np.uint8), [0])
    with pytest.raises(ValueError, match="1..255"):
        kernels.count_at_least(np.zeros(8, np.uint8), [256])


@pytest.mark.parametrize(
    "view",
    [
        lambda e: e,  # a whole event
        lambda e: e[:, :, 2:7],  # the stored frame range: rows of the (H*W, T) matrix T' bytes apart
        lambda e: e[:, :, ::2],  # frame_step 2: frames not at unit stride (the numpy path)
        lambda e: e[:, :, 3:4],  # one frame
        lambda e: e[::2, :, :],  # strided rows (H itself strided)
    ],
)
def test_time_major_matches_numpy_transpose(view):
    event = np.random.default_rng(1).integers(0, 256, (70, 50, 9), dtype=np.uint8)  # H*W not a tile multiple
    src = view(event)
    expected = src.transpose(2, 0, 1)
    np.testing.assert_array_equal(kernels.to_time_major(src), expected)
    for out in (np.full(expected.shape, 7, np.uint8), kernels.frame_buffer(*expected.shape)):
        assert kernels.to_time_major(src, out=out) is out
        np.testing.assert_array_equal(out, expected)


def test_time_major_rejects_a_wrong_out_buffer():
    event = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.to_time_major(event, out=np.empty((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.to_time_major(event, out=np.empty((3, 4, 8), np.uint8)[:, :, :4])
    with pytest.raises(ValueError, match="C-contiguous"):  # frames overlapping each other
        kernels.to_time_major(event, out=np.lib.stride_tricks.as_strided(np.empty(64, np.uint8), (3, 4, 4), (8, 4, 1)))


def test_frame_buffer_frames_are_contiguous_and_a_cache_line_apart():
    buffer = kernels.frame_buffer(5, 384, 384)
    assert buffer.shape == (5, 384, 384) and buffer.dtype == np.uint8
    assert all(buffer[t].flags.c_contiguous for t in range(5))
    assert buffer.strides[0] == 384 * 384 + kernels.ROW_PAD and buffer.strides[0] % 4096 != 0


def test_kernels_run_concurrently_from_threads():
    # The stage calls both from a thread pool; results must not depend on what other threads do.
    rng = np.random.default_rng(5)
    events = [rng.integers(0, 256, (64, 48, 11), dtype=np.uint8) for _ in range(8)]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def work(i: int) -> None:
        frames = kernels.to_time_major(events[i])
        results[i] = (frames, kernels.count_at_least(frames, sevir.VIL_THRESHOLDS))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(events))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, event in enumerate(events):
        np.testing.assert_array_equal(results[i][0], event.transpose(2, 0, 1))
        np.testing.assert_array_equal(results[i][1], reference_counts(event, sevir.VIL_THRESHOLDS))


@pytest.mark.parametrize(
    ("shape", "frames", "rows"),
    [
        ((96, 128, 49), slice(0, 49), (0, 49)),  # tiles of 8192 pixels and a partial last one
        ((96, 128, 49), slice(6, 43), (5, 30)),  # a stored frame range; counted rows inside it
        ((96, 128, 49), slice(0, 49), (7, 7)),  # nothing to count
        ((70, 50, 9), slice(2, 9), (0, 7)),  # H*W = 3500, not a multiple of 8: the two-call fallback
        ((384, 384, 13), slice(0, 13), (1, 12)),  # real SEVIR frame size
    ],
)
def test_transpose_then_count_as_the_stage_does(shape, frames, rows):
    rng = np.random.default_rng(sum(shape))
    event = rng.integers(0, 256, shape, dtype=np.uint8)
    event[event < 120] = 0
    src = event[:, :, frames]
    expected = src.transpose(2, 0, 1)
    padded = kernels.frame_buffer(src.shape[2], *shape[:2])  # frames a cache line apart, as the stage's
    padded.base[...] = 7  # the pads hold something other than zeros: they must not be counted
    for out in (np.full((src.shape[2], *shape[:2]), 9, np.uint8), padded):
        kernels.to_time_major(src, out=out)
        counts = kernels.count_at_least(out[rows[0] : rows[1]], sevir.VIL_THRESHOLDS)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(counts, reference_counts(expected[rows[0] : rows[1]], sevir.VIL_THRESHOLDS))


def test_transpose_then_count_with_a_frame_step_into_padded_frames():
    event = np.random.default_rng(8).integers(0, 256, (64, 64, 25), dtype=np.uint8)
    src = event[:, :, ::2]  # frames not at unit stride: numpy transpose, then the count
    out = kernels.frame_buffer(13, 64, 64)
    kernels.to_time_major(src, out=out)
    counts = kernels.count_at_least(out[2:11], sevir.VIL_THRESHOLDS)
    np.testing.assert_array_equal(out, src.transpose(2, 0, 1))
    np.testing.assert_array_equal(counts, reference_counts(out[2:11], sevir.VIL_THRESHOLDS))


@pytest.mark.parametrize("storm", [False, True])
def test_the_samples_own_events_mostly_exact_zeros(storm):
    # What chunk is fed: an event of the embedded sample, in SEVIR's (H, W, T) layout, its stored
    # frames a range of it; long runs of zero words, rare high values.
    from pipeline.sevir._fields import render_event

    event = render_event(np.random.default_rng(21), 128, 49, storm=storm)
    assert np.mean(event == 0) > 0.3  # radar frames are mostly exact zeros
    src = event[:, :, 1:48]
    frames = kernels.to_time_major(src, out=kernels.frame_buffer(47, 128, 128))
    np.testing.assert_array_equal(frames, src.transpose(2, 0, 1))
    np.testing.assert_array_equal(kernels.count_at_least(frames[5:40], sevir.VIL_THRESHOLDS),
                                  reference_counts(frames[5:40], sevir.VIL_THRESHOLDS))  # fmt: skip
