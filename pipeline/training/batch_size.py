"""``train.batch_size: auto``: the largest batch whose real training step fits the GPU, found by trying.

:func:`find_batch_size` doubles the batch from 1 until a step runs out of memory (or ``max_batch``
is reached), then bisects between the last size that fit and the first that did not. ``try_step(b)``
must run one full training step (forward, backward, optimiser) at batch ``b`` and raise
``torch.OutOfMemoryError`` when it does not fit; the caller restores the weights afterwards.
Each size is tried once; the cache is emptied after a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.training")


def _fits(try_step: Callable[[int], None], batch: int, tried: dict[int, bool]) -> bool:
    if batch not in tried:
        try:
            try_step(batch)
            tried[batch] = True
        except torch.OutOfMemoryError:
            tried[batch] = False
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        log.info("auto batch size: %d %s", batch, "fits" if tried[batch] else "is out of memory")
    return tried[batch]


def find_batch_size(try_step: Callable[[int], None], max_batch: int, at_most: int | None = None) -> int:
    """The largest batch size <= ``max_batch`` (and <= ``at_most``, e.g. the split size) that fits."""
    cap = max(1, min(max_batch, at_most or max_batch))
    tried: dict[int, bool] = {}
    if not _fits(try_step, 1, tried):
        raise PipelineError("train.batch_size = auto: even a batch of 1 does not fit in GPU memory; use a smaller "
                            "model (model.embed_dim, model.patch_size) or windows.downsample")  # fmt: skip
    good, bad = 1, None
    while good < cap:
        nxt = min(good * 2, cap)
        if _fits(try_step, nxt, tried):
            good = nxt
        else:
            bad = nxt
            break
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if _fits(try_step, mid, tried):
                good = mid
            else:
                bad = mid
    log.info(
        "auto batch size: %d (tried %s)",
        good,
        ", ".join(f"{b}{'' if ok else ' OOM'}" for b, ok in sorted(tried.items())),
    )
    return good
