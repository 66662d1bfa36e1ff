"""The per-pixel work of stage chunk, as few calls that release the GIL.

Chunk reads an event, turns it time-major, counts its pixels against the VIL thresholds and
writes it. Reading and writing are I/O; the two steps in between are per-pixel CPU work on
~7 MB per 384x384x49 event and must keep up with the I/O on a 2-core machine. Both are a few
large calls here that run without the GIL, so the worker thread doing them is never held up by
the main thread's reads and writes:

- :func:`to_time_major` is OpenCV's transpose over tiles of 8192 pixels, 18 calls per event,
  into frames one cache line further apart than H*W (:func:`frame_buffer`): ~0.9 ms at
  384x384x49, against ~2.2 ms into back-to-back frames (36 x 4 KiB apart, so the writes to all
  frames compete for one L1 cache set), ~3 ms for 288 tiled numpy copies that each take the GIL
  and ~13 ms for one np.copyto;
- :func:`count_at_least` counts bytes at or above each threshold with a numba kernel that
  compares 8 bytes at a time in 64-bit words (SWAR) and sums per-byte bits in the word
  (~1.6 ms for the six VIL thresholds, against ~3.7 ms for blocked numpy compare-and-count
  passes and ~8 ms for whole-array ones). numba is imported on the first count (~0.5 s per
  process with its compiled code cached in ``__pycache__``; ~1.5 s the first time).

The stage calls one after the other (~2.6 ms): counting each tile of the transpose while it is
still cached was tried and cost more (18 kernel calls per event, ~3.2 ms). Both are exact;
``tests/test_chunk_kernels.py`` checks them against plain numpy on every byte value, in every
byte position of a word, on unaligned, strided and padded input.
"""

from __future__ import annotations

import functools

import numpy as np

_ONES = 0x0101010101010101  # 1 in every byte of a 64-bit word
# Thresholds per kernel call: up to two at or below 128 and four above, the shape of the six VIL
# thresholds (16, 74 | 133, 160, 181, 219); six accumulators stay in registers.
_LOW, _HIGH_SLOTS = 2, 4


def _count_words(words: np.ndarray, stride: int, rows: int, cols: int, low0: np.uint64,
                 low1: np.uint64, high0: np.uint64, high1: np.uint64, high2: np.uint64,
                 high3: np.uint64) -> np.ndarray:  # fmt: skip
    """Bytes >= t in ``rows`` runs of ``cols`` words of ``words`` (uint64, 1-D contiguous), run r
    starting at word ``r * stride``, for two thresholds t <= 128 and four t > 128, given
    as the per-byte word constants of :func:`_constant`; returns the six counts in that order.

    Per byte b, with lo = b & 127 and hi = b & 128: ``lo + (128 - t')`` has its high bit set iff
    lo >= t'. For t <= 128 (t' = t), b >= t iff that bit or hi is set; for t > 128 (t' = t - 128),
    iff both are. No carry crosses a byte (lo + 128 - t' <= 255). An accumulator gains at most 1
    per byte lane per word, so the eight lanes are summed every 255 words, before one overflows.
    """
    high = np.uint64(0x8080808080808080)
    low7 = np.uint64(0x7F7F7F7F7F7F7F7F)
    m8 = np.uint64(0x00FF00FF00FF00FF)
    m16 = np.uint64(0x0000FFFF0000FFFF)
    m32 = np.uint64(0x00000000FFFFFFFF)
    seven, s8, s16, s32 = np.uint64(7), np.uint64(8), np.uint64(16), np.uint64(32)
    out = np.zeros(6, np.int64)
    for r in range(rows):
        base = r * stride
        for start in range(base, base + cols, 255):
            stop = min(start + 255, base + cols)
            a0 = a1 = a2 = a3 = a4 = a5 = np.uint64(0)
            for i in range(start, stop):
                w = words[i]
                lo = w & low7
                hi = w & high
                a0 += (((lo + low0) | hi) & high) >> seven
                a1 += (((lo + low1) | hi) & high) >> seven
                a2 += ((lo + high0) & hi) >> seven
                a3 += ((lo + high1) & hi) >> seven
                a4 += ((lo + high2) & hi) >> seven
                a5 += ((lo + high3) & hi) >> seven
            k = 0
            for a in (a0, a1, a2, a3, a4, a5):  # sum the eight byte lanes (each <= 255)
                a = (a & m8) + ((a >> s8) & m8)
                a = (a & m16) + ((a >> s16) & m16)
                a = (a & m32) + (a >> s32)
                out[k] += np.int64(a)
                k += 1
    return out


@functools.cache
def _count_kernel():
    """:func:`_count_words` compiled by numba (imported here: ~0.2 s, plus ~0.3 s to load the
    compiled code from ``__pycache__``, ~1.5 s to compile it the first time)."""
    import numba

    return numba.njit(nogil=True, cache=True)(_count_words)


def _constant(t: int) -> np.uint64:
    """The word added to ``lo`` for threshold ``t``: 128 - t' in every byte (t' = t, or t - 128 above 128)."""
    return np.uint64((128 - (t if t <= 128 else t - 128)) * _ONES)


def _check_thresholds(thresholds: tuple[int, ...] | list[int]) -> list[int]:
    thresholds = [int(t) for t in thresholds]
    if any(not 1 <= t <= 255 for t in thresholds):
        raise ValueError(f"thresholds must lie in 1..255 for uint8 values, got {thresholds}")
    return thresholds


def _count_word_rows(words: np.ndarray, stride: int, rows: int, cols: int, thresholds: list[int]) -> np.ndarray:
    """Counts >= each threshold over the bytes of runs of ``words`` (see :func:`_count_words`)."""
    counts = np.zeros(len(thresholds), np.int64)
    low = [k for k, t in enumerate(thresholds) if t <= 128]
    high = [k for k, t in enumerate(thresholds) if t > 128]
    kernel = _count_kernel()
    while low or high:  # one call for the VIL thresholds; more (padded) calls for other sets
        lows, low = low[:_LOW], low[_LOW:]
        highs, high = high[:_HIGH_SLOTS], high[_HIGH_SLOTS:]
        consts = [_constant(thresholds[k]) for k in lows] + [_constant(1)] * (_LOW - len(lows))
        consts += [_constant(thresholds[k]) for k in highs] + [_constant(255)] * (_HIGH_SLOTS - len(highs))
        got = kernel(words, stride, rows, cols, *consts)
        counts[lows] = got[: len(lows)]
        counts[highs] = got[_LOW : _LOW + len(highs)]
    return counts


def count_at_least(values: np.ndarray, thresholds: tuple[int, ...] | list[int]) -> np.ndarray:
    """How many of ``values`` (uint8, any shape) are >= each threshold (ints in 1..255), as
    int64 in the thresholds' order. Exact; runs without the GIL. Frames at a distance (as in
    :func:`frame_buffer`) are counted where they are; other strided ``values`` are copied first."""
    if values.dtype != np.uint8:
        raise TypeError(f"count_at_least takes uint8 values, not {values.dtype}")
    thresholds = _check_thresholds(thresholds)
    rows = _word_rows(values)
    if rows is not None:
        return _count_word_rows(*rows, thresholds)
    flat = np.ascontiguousarray(values).reshape(-1)
    head = min(-flat.ctypes.data % 8, flat.size)  # bytes before the first 8-byte-aligned address
    n_words = (flat.size - head) // 8
    body = flat[head : head + 8 * n_words].view(np.uint64)
    edges = np.concatenate([flat[:head], flat[head + 8 * n_words :]])  # < 16 bytes, counted by numpy
    return _count_word_rows(body, n_words, 1, n_words, thresholds) + [np.count_nonzero(edges >= t) for t in thresholds]


def _word_rows(values: np.ndarray) -> tuple[np.ndarray, int, int, int] | None:
    """``values`` (uint8, 2-D or more) as ``(words, stride, rows, cols)`` for
    :func:`_count_words` when each of its first-axis slices is contiguous, 8-byte aligned and a
    whole number of words, the slices evenly spaced; else None."""
    if values.ndim < 2 or values.size == 0 or values.ctypes.data % 8:
        return None
    rows = values.shape[0]
    row_bytes = values[0].size
    # Slices share their inner strides, so one contiguous slice means all are; they lie strides[0] apart.
    if not values[0].flags.c_contiguous or (rows > 1 and values.strides[0] < row_bytes):
        return None
    stride = values.strides[0] if rows > 1 else row_bytes
    if row_bytes % 8 or stride % 8:
        return None
    span = np.lib.stride_tricks.as_strided(values, ((rows - 1) * stride + row_bytes,), (1,))
    return span.view(np.uint64), stride // 8, rows, row_bytes // 8


def _check_out(event: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``out`` for ``event``'s frames: (T, H, W) of its dtype, each frame C-contiguous (frames may
    lie further apart, as in :func:`frame_buffer`); a new C-contiguous array when None."""
    h, w, t = event.shape
    if out is None:
        return np.empty((t, h, w), dtype=event.dtype)
    item = event.dtype.itemsize
    if (out.shape != (t, h, w) or out.dtype != event.dtype or out.strides[1:] != (w * item, item)
            or (t > 1 and out.strides[0] < h * w * item)):  # fmt: skip
        raise ValueError(f"out must be a {(t, h, w)} {event.dtype} array of C-contiguous frames, got {out.shape} "
                         f"{out.dtype} with strides {out.strides}")  # fmt: skip
    return out


def frame_buffer(n_frames: int, h: int, w: int) -> np.ndarray:
    """An empty uint8 (n_frames, h, w) array whose frames are C-contiguous but :data:`ROW_PAD`
    bytes further apart than h*w: the out buffer for :func:`to_time_major`.

    The transpose writes every frame at once, at the same offset in each. At 384x384 frames are
    36 x 4 KiB apart, so all those writes fall in one L1 cache set, which holds 12 lines: the cache
    thrashes and the transpose runs at less than half speed (~2.2 ms at 384x384x49, against ~0.9 ms
    with the pad).
    """
    flat = np.empty((n_frames, h * w + ROW_PAD), np.uint8)
    return flat[:, : h * w].reshape(n_frames, h, w)


def _matrix(event: np.ndarray) -> np.ndarray | None:
    """``event`` (H, W, T) as an (H*W, T) uint8 matrix OpenCV takes without a copy (rows any
    distance apart, frames at unit stride: any frame range of a buffer), or None."""
    h, w, t = event.shape
    pixel_stride = event.strides[1]
    if event.dtype != np.uint8 or event.size == 0 or event.strides[2] != 1 or event.strides[0] != w * pixel_stride:
        return None
    return np.lib.stride_tricks.as_strided(event, (h * w, t), (pixel_stride, 1))


def _transpose(src: np.ndarray, dst: np.ndarray) -> None:
    done = _cv2().transpose(src, dst=dst)
    if done.ctypes.data != dst.ctypes.data:  # OpenCV gave a new array instead of filling ours
        dst[...] = done


def to_time_major(event: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """One event from SEVIR's (H, W, T) layout to (T, H, W), into ``out`` if given (each frame
    C-contiguous; :func:`frame_buffer` makes the fast kind), else into a new C-contiguous array.

    ``event`` may be a view: a frame range of a larger (H, W, T') buffer, or every k-th frame.
    When its frames sit at unit stride (any frame range), OpenCV transposes the (H*W, T) matrix
    in tiles of :data:`_TILE` pixels, each call without the GIL; otherwise (frame_step > 1) numpy
    copies it in tiles that stay in cache.
    """
    h, w, t = event.shape
    out = _check_out(event, out)
    dst = out.reshape(t, h * w)
    src = _matrix(event)
    if src is not None:
        for p0 in range(0, h * w, _TILE):
            _transpose(src[p0 : p0 + _TILE], dst[:, p0 : p0 + _TILE])
        return out
    src = event.reshape(h * w, t)  # a copy only when H and W themselves are strided
    for i in range(0, h * w, _TRANSPOSE_TILE):
        dst[:, i : i + _TRANSPOSE_TILE] = src[i : i + _TRANSPOSE_TILE].T
    return out


# Pixels per tile of to_time_major: 8192 x 49 bytes in. Measured at 384x384x49
# (OpenCV alone, CPU ms): into frames 36 x 4 KiB apart, 1024 ~2.03, 8192 ~1.97, 32768 ~2.06, the whole
# event in one call ~2.24; into frame_buffer's, 8192 ~0.80, the whole event in one call ~1.30.
_TILE = 8192
# Extra bytes between frames in frame_buffer (one cache line, a multiple of 8 for the word count).
ROW_PAD = 64
# Pixels per tile of the numpy path: 512 x T bytes in and out stay in L1/L2.
_TRANSPOSE_TILE = 512


def _cv2():
    import cv2  # ~0.1 s to import; only chunk needs it here

    return cv2
