"""DATSwinLSTM-D-Memory: SwinLSTM-D with deformable window attention and a long-term motion memory.

The backbone is :class:`models.swinlstm.SwinLSTMD` whose blocks use
:class:`models.dat.DeformableWindowAttention`. Once per sequence a motion query
(:class:`models.memory.MotionQuery`, at the bottom token grid H / (p 2^S))
addresses the memory bank (:class:`models.memory.MemoryBank`), and the recalled
map is fused into the backbone (``model.memory.fusion``):

- ``reference`` (default, as the published code): at forecast steps the deepest
  *down* cell's state c becomes Linear([c; g m]) with a per-token gate g, the
  memory brought to that cell's grid (one level finer than the query);
- ``gated`` / ``concat`` / ``cross_attention``: into the bottom *up* cell's
  hidden state at every step (see models.memory).

Two query encoders, as LMC-Memory and the reference (``model.memory.encoders:
separate``): the *context* encoder reads the long clip in phase 1, the
*matching* encoder the short input in phase 2 and at inference. With
``shared`` one encoder serves both.

Two-phase training, two optimiser steps per batch (as the published script)::

    # x = clip[:, :T_in], y = clip[:, T_in:T_in + T_out]; long = inputs + targets (memory_len >= T_in frames)
    optimizer = torch.optim.AdamW(model.parameters(), ...)   # one optimiser, bank included
    # phase 1: bank trainable, query from the long clip (context encoder)
    loss = loss_fn(model(x, T_out, memory_x=long, phase=1), y)
    optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
    # phase 2: bank frozen (read detached), query from the short input only (matching encoder)
    loss = loss_fn(model(x, T_out, phase=2), y)
    optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
    # inference: model(x, T_out) (phase 2 is the default)

``zero_grad(set_to_none=True)`` matters: parameters a phase does not use keep
``.grad`` None, and AdamW skips parameters without a gradient (no weight decay,
no momentum), so a phase-2 step leaves the bank and the context encoder
unchanged, and a phase-1 step leaves the matching encoder unchanged. The same
calls serve a schedule that runs all phase-1 epochs first, then all phase-2
epochs. ``set_memory_trainable(False)`` (bank and context encoder) is optional
(phase 2 detaches the bank and never runs the context encoder); do not toggle
``requires_grad`` after wrapping in DDP.

DDP: :meth:`unused_parameters` lists, per phase, the parameters without a
gradient (phase 2: ``memory.bank`` and the context encoder; phase 1: the
matching encoder), so wrap with ``DistributedDataParallel(model,
find_unused_parameters=True)`` whenever either list is non-empty.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from models.base import Forecaster, check_input
from models.config import ModelConfig
from models.dat import DeformableWindowAttention
from models.memory import ConcatFusion, CrossAttentionFusion, GatedFusion, MemoryBank, MotionQuery, ReferenceFusion
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
                dim,
                heads,
                cfg.window_size,
                shifted,
                dat.groups,
                dat.offset_range,
                dat.offset_kernel,
                cfg.dropout,
                sampling=dat.sampling,
                pos=cfg.pos,
            )

        S, D = cfg.stages, cfg.embed_dim
        fusion: nn.Module
        if mem.fusion == "reference":  # the deepest down cell: D 2^(S-1) channels, one level above the query
            fusion, site = ReferenceFusion(D * 2 ** (S - 1), mem.dim, scale=2), "down"
        elif mem.fusion == "gated":  # the bottom up cell, after all `stages` patch mergings: D 2^S channels
            fusion, site = GatedFusion(D * 2**S, mem.dim), "up"
        elif mem.fusion == "concat":
            fusion, site = ConcatFusion(D * 2**S, mem.dim), "up"
        else:
            fusion, site = CrossAttentionFusion(D * 2**S, mem.dim, cfg.heads[-1]), "up"
        self.backbone = SwinLSTMD(cfg, attention, deep_fusion=fusion, fusion_site=site)

        def encoder() -> MotionQuery:
            return MotionQuery(cfg.in_channels, mem.dim, cfg.patch_size, S, mem.corr_radius)

        self.context_encoder = encoder()  # phase 1: the long clip
        self.matching_encoder = encoder() if mem.encoders == "separate" else None  # phase 2 and inference
        self.memory = MemoryBank(mem.slots, mem.dim, mem.read, mem.heads, cfg.dropout)

    def encoder(self, phase: int) -> MotionQuery:
        """The query encoder of ``phase``: context (1) or matching (2; the context one when shared)."""
        if phase == 2 and self.matching_encoder is not None:
            return self.matching_encoder
        return self.context_encoder

    def forward(self, x: Tensor, out_len: int, memory_x: Tensor | None = None, phase: int = 2) -> Tensor:
        """(B, T_in, C, H, W) on 0-1 -> (B, out_len, C, H, W).

        phase 1: the context encoder reads ``memory_x`` (B, T_long, C, H, W), the
        long clip (inputs + targets, T_long >= T_in), and the bank is trainable.
        phase 2 (default, inference): the matching encoder reads ``x`` alone,
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
        memory = self.memory(self.encoder(phase)(clip), frozen=phase == 2)  # (B, h, w, memory.dim)
        return self.backbone(x, out_len, memory)

    def memory_parameters(self) -> Iterator[nn.Parameter]:
        """Trained in phase 1 only: the bank, and the context encoder when the encoders are separate."""
        yield self.memory.bank
        if self.matching_encoder is not None:
            yield from self.context_encoder.parameters()

    def unused_parameters(self, phase: int) -> list[str]:
        """Names of the parameters that get no gradient in ``phase`` (1 or 2), in ``named_parameters`` order."""
        if phase == 2:
            prefixes = ("memory.bank", "context_encoder.") if self.matching_encoder is not None else ("memory.bank",)
        else:
            prefixes = ("matching_encoder.",)
        return [n for n, _ in self.named_parameters() if n.startswith(prefixes)]
