"""Training data: loaders over the windows files, seeded epoch samplers, oversampling, augmentation.

The loaders yield raw uint8 batches (``WindowDataset(raw=True)``); :func:`to_device` moves them with
non-blocking copies (pinned memory on CUDA) and converts to the 0-1 scale on the device.

Shuffling is a pure function of (``train.seed``, epoch): every epoch's order is drawn from a fresh
generator seeded with both, so a resumed run replays exactly the order an uninterrupted run would
have had, and every DDP rank draws the same permutation before taking its shard.

A capped validation (``train.val_max_windows`` / ``train.val_max_batches``) reads windows evenly
spaced over the whole val split (:class:`SpreadSampler`), not its first ones: windows files are in
event order (all random events before the storm events), so a prefix is a biased slice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from pipeline.errors import DataError
from pipeline.sevir.dataset import WindowDataset, to_unit

log = logging.getLogger("pipeline.training")


class EpochSampler(Sampler[int]):
    """Seeded per-epoch shuffle (optionally weighted, with replacement), sharded over DDP ranks.

    Without ``weights``: a permutation of all indices, padded by wrapping so every rank gets the
    same count (as DistributedSampler). With ``weights``: ``len(dataset)`` draws with replacement,
    each index in proportion to its weight (heavy-rain oversampling). Call :meth:`set_epoch` every
    epoch.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, weights: torch.Tensor | None = None,
                 num_replicas: int = 1, rank: int = 0) -> None:  # fmt: skip
        self.n, self.seed, self.shuffle, self.weights = n, seed, shuffle, weights
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(n / num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.num_replicas
        if order and len(order) < total:
            order = (order * math.ceil(total / len(order)))[:total]
        return iter(order[self.rank : total : self.num_replicas])


def spread_indices(n: int, k: int) -> list[int]:
    """``k`` of the indices ``0..n-1``, evenly spaced over all of them (the middle of each of ``k``
    equal strata), in increasing order; all ``n`` when ``k`` is 0 or at least ``n``."""
    if k <= 0 or k >= n:
        return list(range(n))
    return [int((2 * j + 1) * n // (2 * k)) for j in range(k)]


class SpreadSampler(Sampler[int]):
    """A fixed subset of ``k`` of ``n`` windows evenly spaced over the file (:func:`spread_indices`):
    the same windows, in the same order, every epoch, every run and every trial of the same ``k``."""

    def __init__(self, n: int, k: int) -> None:
        self.n = n
        self.indices = spread_indices(n, k)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def describe(self) -> str:
        """One line for the log: how much of the split the subset covers."""
        k = len(self.indices)
        if k >= self.n:
            return f"validation: all {self.n} windows of the split"
        return f"validation: {k} of {self.n} windows ({100 * k / self.n:.0f}%), evenly spaced over the split"


def heavy_weights(path: Path, threshold: int, min_fraction: float, factor: float) -> torch.Tensor:
    """Sampling weight per window of a windows file: ``factor`` for heavy-rain windows, 1 otherwise.

    A window is heavy when at least ``min_fraction`` of its target pixels reach ``threshold``
    (VIL 0-255). One pass over the stored events (each event once), frame by frame.
    """
    ds = WindowDataset(path, raw=True)
    try:
        with h5py.File(path, "r") as h5:
            vil = h5["vil"]
            n_events, n_frames = int(vil.shape[0]), int(vil.shape[1])
            heavy = np.zeros((n_events, n_frames), dtype=np.float64)  # heavy share per stored frame
            for e in tqdm(range(n_events), desc=f"oversample scan {path.name}", unit="event", leave=False):
                frames = vil[e]  # (F, H, W) uint8
                heavy[e] = (frames >= threshold).mean(axis=(1, 2))
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: cannot scan for heavy rain ({err}); rerun the chunk stage") from None
    events = ds._event.astype(np.int64)
    starts = ds._start.astype(np.int64)
    offsets = np.arange(ds.origin, ds.origin + ds.out_len)  # the target frames of each window
    share = heavy[events[:, None], starts[:, None] + offsets[None, :]].mean(axis=1)
    weights = np.where(share >= min_fraction, factor, 1.0)
    log.info("oversampling: %d of %d train windows are heavy (>= %.1f%% of target pixels >= %d), drawn %.1fx as often",
             int((share >= min_fraction).sum()), len(share), 100 * min_fraction, threshold, factor)  # fmt: skip
    return torch.as_tensor(weights, dtype=torch.float64)


def make_loader(path: Path, *, batch_size: int, sampler: Sampler | None, num_workers: int, pin_memory: bool,
                with_memory: bool, in_len: int, out_len: int, drop_last: bool, max_windows: int = 0) -> DataLoader:  # fmt: skip
    """A loader of raw uint8 batches ``{"inputs", "targets"[, "memory"]}`` (B, T, 1, H, W).

    ``max_windows`` > 0 (with ``sampler`` None): a :class:`SpreadSampler` of that many windows.
    """
    dataset = WindowDataset(path, in_len=in_len, out_len=out_len, with_memory=with_memory, raw=True)
    if len(dataset) == 0:
        raise DataError(f"{path}: no windows in this split; widen data.split or fetch more events")
    if sampler is None and max_windows > 0:
        sampler = SpreadSampler(len(dataset), max_windows)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last, persistent_workers=num_workers > 0)  # fmt: skip


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """uint8 batch -> float32 0-1 tensors on ``device`` (non-blocking copies, division on the device)."""
    return {k: to_unit(v.to(device, non_blocking=True)) for k, v in batch.items()}


def augment(batch: dict[str, torch.Tensor], cfg, in_len: int, out_len: int) -> dict[str, torch.Tensor]:
    """Training-only augmentation of a 0-1 batch on its device (``train.augment``).

    - ``time_shift``: the whole batch's window moves s ~ U{0..time_shift} frames earlier, cut from
      the stored long clip (``memory``), which then ends where the shifted window ends.
    - ``mask_prob``: each ``mask_size`` square of the inputs is zeroed in all input frames with
      this probability (the radar gaps and clutter of real data).
    - ``noise_std``: Gaussian noise on the inputs, clamped to [0, 1].

    Targets are never noised or masked. Uses the global torch RNG (saved in checkpoints).
    """
    if cfg.time_shift and "memory" in batch:
        clip = batch["memory"]  # (B, L, C, H, W), ends where the stored window ends
        shift = int(torch.randint(0, cfg.time_shift + 1, ()).item())  # once per batch, on the host generator
        if shift:
            end = clip.shape[1] - shift
            batch = dict(batch, inputs=clip[:, end - out_len - in_len : end - out_len],
                         targets=clip[:, end - out_len : end], memory=clip[:, :end])  # fmt: skip
    x = batch["inputs"]
    if cfg.mask_prob > 0:
        B, _, C, H, W = x.shape
        s = cfg.mask_size
        keep = (torch.rand(B, 1, C, -(-H // s), -(-W // s), device=x.device) >= cfg.mask_prob).to(x.dtype)
        keep = keep.repeat_interleave(s, dim=3).repeat_interleave(s, dim=4)[..., :H, :W]
        x = x * keep
    if cfg.noise_std > 0:
        x = (x + cfg.noise_std * torch.randn_like(x)).clamp_(0.0, 1.0)
    if x is not batch["inputs"]:
        batch = dict(batch, inputs=x)
    return batch
