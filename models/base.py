"""What every forecaster in the zoo promises, so the trainer calls them all the same way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

from torch import Tensor, nn

from models.config import ModelConfig


class Forecaster(nn.Module):
    """Base of every network: ``forward(x, out_len, memory_x=None, phase=2)``.

    ``x`` is (B, T_in, C, H, W) on the 0-1 scale (VIL / 255); the result is
    (B, out_len, C, H, W) on the same scale (not clamped). Models without a
    memory ignore ``memory_x`` and ``phase``; for them the memory hooks below
    are no-ops, so a trainer can treat every model alike.
    """

    uses_memory: ClassVar[bool] = False  # True: train with two phases per batch (see datswinlstm_memory)

    def memory_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that train only in phase 1 (the memory bank, the context encoder); none here."""
        return iter(())

    def set_memory_trainable(self, flag: bool) -> None:
        """Toggle ``requires_grad`` of :meth:`memory_parameters` (phase 2 never needs it: it detaches)."""
        for p in self.memory_parameters():
            p.requires_grad_(flag)

    def unused_parameters(self, phase: int) -> list[str]:
        """Names of parameters that get no gradient in ``phase`` (DDP needs ``find_unused_parameters`` if any)."""
        return []

    def phase2_unused_parameters(self) -> list[str]:
        """Names of parameters that get no gradient in phase 2: ``unused_parameters(2)``."""
        return self.unused_parameters(2)


def check_input(x: Tensor, cfg: ModelConfig, out_len: int) -> None:
    """Raise ValueError unless x is (B, T, cfg.in_channels, H, W) with H, W allowed by ``cfg``; shapes only."""
    if x.ndim != 5:
        raise ValueError(f"expected input (B, T, C, H, W), got shape {tuple(x.shape)}")
    _, _, channels, height, width = x.shape
    if channels != cfg.in_channels:
        raise ValueError(f"input has {channels} channels but model.in_channels = {cfg.in_channels}")
    cfg.check_frame_size(height, width)
    if out_len < 1:
        raise ValueError(f"out_len must be >= 1, got {out_len}")
