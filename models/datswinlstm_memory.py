"""DATSwinLSTM-D-Memory: SwinLSTM-D with deformable window attention and a long-term motion memory.

The backbone is :class:`models.swinlstm.SwinLSTMD` whose blocks use
:class:`models.dat.DeformableWindowAttention`. Once per sequence a motion
query (:class:`models.memory.MotionQuery`) addresses the memory bank; the
recalled map is fused into the deepest cell's hidden state at every step
through a sigmoid channel gate (:class:`models.memory.GatedFusion`): the bottom
up cell, below the last patch merging, at embed_dim * 2^stages channels on the
(H / (patch 2^stages), W / (patch 2^stages)) grid, where the query is made.

Two-phase training, two optimiser steps per batch (as the published script)::

    # x = clip[:, :T_in], y = clip[:, T_in:T_in + T_out]; long = inputs + targets (memory_len >= T_in frames)
    optimizer = torch.optim.AdamW(model.parameters(), ...)   # one optimiser, bank included
    # phase 1: bank trainable, query from the long clip
    loss = loss_fn(model(x, T_out, memory_x=long, phase=1), y)
    optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
    # phase 2: bank frozen (read detached), query from the short input only
    loss = loss_fn(model(x, T_out, phase=2), y)
    optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
    # inference: model(x, T_out) (phase 2 is the default)

``zero_grad(set_to_none=True)`` matters: in phase 2 the bank's ``.grad`` stays
None, and AdamW skips parameters without a gradient (no weight decay, no
momentum), so the bank is unchanged by the phase-2 step. The same calls serve
a schedule that runs all phase-1 epochs first, then all phase-2 epochs.
``set_memory_trainable(False)`` is optional (phase 2 detaches regardless); do
not toggle ``requires_grad`` after wrapping in DDP.

DDP: the bank (``memory.bank``, listed by :meth:`phase2_unused_parameters`)
gets no gradient in phase 2, so wrap with
``DistributedDataParallel(model, find_unused_parameters=True)``. Globally unused
parameters keep ``grad=None`` under DDP, so the above still holds. Every
parameter is used in phase 1.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from models.base import Forecaster, check_input
from models.config import ModelConfig
from models.dat import DeformableWindowAttention
from models.memory import GatedFusion, MemoryBank, MotionQuery
from models.registry import register
from models.swinlstm import SwinLSTMD


@register("datswinlstm_memory")
class DATSwinLSTMMemory(Forecaster):
    """Uses every Swin key of ``model.*`` plus ``model.dat.*`` and ``model.memory.*``."""

    uses_memory = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dat, mem = cfg.dat, cfg.memory

        def attention(dim: int, heads: int, shifted: bool) -> nn.Module:
            return DeformableWindowAttention(
                dim, heads, cfg.window_size, shifted, dat.groups, dat.offset_range, dat.offset_kernel, cfg.dropout
            )

        deep_dim = cfg.embed_dim * 2**cfg.stages  # the bottom up cell, after all `stages` patch mergings
        self.backbone = SwinLSTMD(cfg, attention, deep_fusion=GatedFusion(deep_dim, mem.dim))
        self.query = MotionQuery(cfg.in_channels, mem.dim, cfg.patch_size, cfg.stages, mem.corr_radius)
        self.memory = MemoryBank(mem.slots, mem.dim)

    def forward(self, x: Tensor, out_len: int, memory_x: Tensor | None = None, phase: int = 2) -> Tensor:
        """(B, T_in, C, H, W) on 0-1 -> (B, out_len, C, H, W).

        phase 1: the query comes from ``memory_x`` (B, T_long, C, H, W), the long
        clip (inputs + targets, T_long >= T_in), and the bank is trainable.
        phase 2 (default, inference): the query comes from ``x`` alone,
        ``memory_x`` is ignored, and the bank is read detached (never trained).
        """
        check_input(x, self.cfg, out_len)
        if phase == 1:
            if memory_x is None:
                raise ValueError("phase 1 needs memory_x, the long clip (inputs + targets)")
            if memory_x.ndim != 5 or memory_x.shape[0] != x.shape[0] or memory_x.shape[2:] != x.shape[2:]:
                raise ValueError(f"memory_x {tuple(memory_x.shape)} must match x {tuple(x.shape)} except in time")
            if memory_x.shape[1] < x.shape[1]:
                raise ValueError(f"memory_x has {memory_x.shape[1]} frames, fewer than the {x.shape[1]} inputs")
            clip = memory_x
        elif phase == 2:
            clip = x
        else:
            raise ValueError(f"phase must be 1 or 2, got {phase!r}")
        memory = self.memory(self.query(clip), frozen=phase == 2)  # (B, h, w, memory.dim)
        return self.backbone(x, out_len, memory)

    def memory_parameters(self) -> Iterator[nn.Parameter]:
        """The memory bank: trained in phase 1 only."""
        yield self.memory.bank

    def phase2_unused_parameters(self) -> list[str]:
        return ["memory.bank"]
