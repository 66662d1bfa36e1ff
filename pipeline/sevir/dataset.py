"""torch Dataset over the windows files written by stage chunk (see :mod:`pipeline.sevir.windows`).

Scale: the files hold VIL as uint8 0-255. Items are float32 on the 0-1 scale (value / 255)
unless ``raw=True``, which returns the uint8 0-255 tensors unchanged.

For training, ask for ``raw=True`` and convert on the device with :func:`to_unit`: a uint8
batch is 4x less host-to-device traffic than float32, and the division is free on a GPU::

    loader = make_loader("data/windows/train.h5", batch_size=8, shuffle=True, num_workers=4, raw=True)
    for batch in loader:
        inputs = to_unit(batch["inputs"].to(device, non_blocking=True))    # (B, T_in, 1, H, W) 0-1
        targets = to_unit(batch["targets"].to(device, non_blocking=True))  # (B, T_out, 1, H, W) 0-1
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.errors import DataError


def to_unit(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 VIL 0-255 -> ``dtype`` on the 0-1 scale (value / 255), on ``x``'s device."""
    return x.to(dtype).div_(255.0)


# The HDF5 chunk cache of a reading process: none. Every frame is one chunk, read whole; without a
# cache HDF5 reads it straight into the item's array. A cache adds a copy per chunk and helps no
# access order: per 25-frame item at 384x384, warm, 0 MB: 0.45 ms in file order / 0.74 shuffled;
# 1 MB (h5py's default): 0.52 / 0.84; 16 MB: 1.08 / 1.19 (file order re-reads overlapping frames).
READ_CACHE_BYTES = 0


class WindowDataset(Dataset):
    """Windows of one split file. Item ``i`` is a dict of tensors shaped (T, C=1, H, W):

    - ``inputs``  (in_len, 1, H, W)   the frames before the forecast origin
    - ``targets`` (out_len, 1, H, W)  the frames after it
    - ``memory``  (long_len, 1, H, W) only with ``with_memory``: the phase-1 long clip, the
      ``long_len`` frames of the event ending where the stored window ends (the window itself
      when the file's long_len equals its window_len)

    float32 on the 0-1 scale (uint8 / 255); uint8 0-255 with ``raw=True`` (see :func:`to_unit`).
    A dict of equal-shaped tensors batches with the default collate into (B, T, 1, H, W).

    ``in_len`` / ``out_len`` default to the file's. Shorter ones are cut around the stored
    forecast origin (inputs end, targets start there), moved only as far as needed to fit the
    window; more than the window holds is an error. ``memory`` is always the stored clip (it
    ends where the stored window ends).

    The file stores each event once (``vil`` (events, frames, H, W)) and window ``i`` as a row and
    a start (``window_event``, ``window_start``, see :mod:`pipeline.sevir.windows`): an item reads only
    the frames it returns, in one call. The window index is loaded on construction (8 bytes a
    window); the HDF5 file is opened on first access, once per process (a DataLoader worker,
    forked or spawned, opens its own), so the dataset pickles and is safe with ``num_workers > 0``.
    """

    def __init__(self, path: str | Path, in_len: int | None = None, out_len: int | None = None,
                 with_memory: bool = False, raw: bool = False):  # fmt: skip
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: windows file not found; run the chunk stage (dvc repro chunk)")
        try:
            with h5py.File(self.path, "r") as h5:
                if "window_event" not in h5:
                    raise DataError(f"{self.path}: no window index (an older chunk layout); rerun the chunk stage")
                vil = h5["vil"]
                n_frames = int(vil.shape[1])
                self.frame_shape = (int(vil.shape[2]), int(vil.shape[3]))
                self.window_len, self.long_len = int(h5.attrs["window_len"]), int(h5.attrs["long_len"])
                stored_in = int(h5.attrs["in_len"])
                self._event = h5["window_event"][()]  # int32: 8 bytes a window in each worker
                self._start = h5["window_start"][()]
                n_events = int(vil.shape[0])
        except (OSError, KeyError) as err:
            raise DataError(f"{self.path}: not a windows file ({err}); rerun the chunk stage") from None
        starts = self._start.astype(np.int64)
        if len(self._event) != len(starts) or (
            len(starts)
            and (
                self._event.min() < 0
                or self._event.max() >= n_events
                or (starts + self.window_len - self.long_len).min() < 0
                or (starts + self.window_len).max() > n_frames
            )
        ):
            raise DataError(f"{self.path}: window index does not fit its {n_events} x {n_frames}-frame events; "
                            "the file is damaged, rerun the chunk stage")  # fmt: skip
        self._len = len(self._event)
        self.in_len = stored_in if in_len is None else in_len
        self.out_len = self.window_len - stored_in if out_len is None else out_len
        if self.in_len < 1 or self.out_len < 1 or self.in_len + self.out_len > self.window_len:
            raise DataError(f"{self.path}: in_len {self.in_len} + out_len {self.out_len} does not fit the stored "
                            f"{self.window_len}-frame windows; rerun chunk with larger windows.in_len/out_len")  # fmt: skip
        # The forecast origin: the stored one, shifted the least needed to fit the requested lengths.
        self.origin = min(max(stored_in, self.in_len), self.window_len - self.out_len)
        self.with_memory, self.raw = with_memory, raw
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._vil: h5py.Dataset | None = None

    def __len__(self) -> int:
        return self._len

    def _file(self) -> h5py.File:
        # Reopen in a new process: an HDF5 handle inherited through fork must not be shared.
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r", rdcc_nbytes=READ_CACHE_BYTES)
            self._pid = os.getpid()
            self._vil = self._h5["vil"]
        return self._h5

    def _tensor(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(frames).unsqueeze(1)  # (T, H, W) -> (T, 1, H, W)
        return x if self.raw else to_unit(x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self._len <= index < self._len:
            raise IndexError(f"window {index} out of range for {self._len} windows in {self.path}")
        index = int(index) % self._len
        self._file()
        row, start = int(self._event[index]), int(self._start[index])
        # One read of the frames the item needs: the long clip (which ends with the window), or
        # just inputs + targets.
        lo = start + self.window_len - self.long_len if self.with_memory else start + self.origin - self.in_len
        hi = start + self.window_len if self.with_memory else start + self.origin + self.out_len
        clip = self._vil[row, lo:hi]  # (hi - lo, H, W) uint8
        origin = start + self.origin - lo  # the forecast origin within clip
        item = {
            "inputs": self._tensor(clip[origin - self.in_len : origin]),
            "targets": self._tensor(clip[origin : origin + self.out_len]),
        }
        if self.with_memory:
            item["memory"] = self._tensor(clip)
        return item

    def info(self, index: int) -> dict[str, Any]:
        """Where window ``index`` comes from: event id, its first frame's index in the original event
        (5-minute frames), time_utc (epoch seconds)."""
        h5 = self._file()
        row = int(self._event[index])
        return {
            "event_id": h5["event_id"][row].decode(),
            # frames of the original 5-minute event: rows hold every frame_step-th frame
            "start": int(h5["frame_offset"][row]) + int(h5.attrs.get("frame_step", 1)) * int(self._start[index]),
            "time_utc": int(h5["time_utc"][row]),
        }

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._pid = self._vil = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # An open h5py handle does not pickle; the copy reopens lazily in its own process.
        state["_h5"] = state["_pid"] = state["_vil"] = None
        return state


def make_loader(path: str | Path, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                pin_memory: bool | None = None, distributed: bool = False, drop_last: bool = False,
                seed: int = 0, in_len: int | None = None, out_len: int | None = None,
                with_memory: bool = False, raw: bool = False, **loader_kwargs: Any) -> DataLoader:  # fmt: skip
    """A DataLoader over one split file, batches of dicts of (B, T, 1, H, W) tensors.

    ``pin_memory`` defaults to whether CUDA is available. With ``distributed`` each rank gets
    its shard through a DistributedSampler (needs an initialised process group, or pass
    ``num_replicas``/``rank`` in ``loader_kwargs``); call ``loader.sampler.set_epoch(epoch)``
    every epoch so the shuffle changes. Workers stay alive across epochs (file handles too).
    The trainer should pass ``raw=True`` and apply :func:`to_unit` on the device.
    """
    dataset = WindowDataset(path, in_len=in_len, out_len=out_len, with_memory=with_memory, raw=raw)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    sampler = None
    if distributed:
        sampler_kwargs = {k: loader_kwargs.pop(k) for k in ("num_replicas", "rank") if k in loader_kwargs}
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, **sampler_kwargs)
    generator = None
    if shuffle and sampler is None:
        generator = torch.Generator().manual_seed(seed)
    loader_kwargs.setdefault("persistent_workers", num_workers > 0)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last, generator=generator, **loader_kwargs,
    )  # fmt: skip


def check_windows_file(path: str | Path, frame_step: int, frame_size: int | None = None) -> None:
    """A windows file as stage chunk makes it with the params' ``windows.*``, or one :class:`DataError` line:
    readable HDF5 with a uint8 ``vil`` of (events, frames, H, W), made at ``frame_step`` (the
    ``frame_step`` attribute; 1 when absent) and, when given, of ``frame_size`` x ``frame_size`` frames."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: windows file not found; run the chunk stage (dvc repro chunk)")
    try:
        with h5py.File(path, "r") as h5:
            vil = h5["vil"]
            dtype, shape = vil.dtype, tuple(vil.shape)
            step = int(h5.attrs.get("frame_step", 1))
    except (OSError, KeyError, TypeError, ValueError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise DataError(f"{path}: not a windows file ({why}); rerun the chunk stage (dvc repro chunk)") from None
    if dtype != np.uint8 or len(shape) != 4:
        raise DataError(f"{path}: vil is {dtype} of shape {shape}, not uint8 (events, frames, height, width) as "
                        "the chunk stage writes it; rerun the chunk stage (dvc repro chunk)")  # fmt: skip
    if step != frame_step:
        raise DataError(f"{path}: made at windows.frame_step = {step} but params.yaml has {frame_step}; rerun the "
                        "chunk stage (dvc repro chunk)")  # fmt: skip
    if frame_size is not None and shape[2:] != (frame_size, frame_size):
        raise DataError(f"{path}: frames are {shape[2]}x{shape[3]} but params.yaml gives {frame_size}x{frame_size} "
                        "(data.*.size / windows.downsample); rerun the chunk stage (dvc repro chunk)")  # fmt: skip
