"""Long-term motion memory (after LMC-Memory, Lee et al. 2021): query, bank, recall, fusion.

- :class:`MotionQuery` turns a clip of any length T >= 1 into a query map at
  the backbone's deepest token grid: a per-frame conv stack over each frame and
  its difference to the previous frame, a correlation-based motion module
  (local cost volume between consecutive feature maps -> soft-argmax flow and
  matching probabilities, as in MotionSqueeze), then a separable 3D conv and
  mean pooling over time.
- :class:`MemoryBank` holds the learnable slots (slots x dim) and recalls a
  memory map per spatial location: cosine similarity -> softmax -> weighted
  sum of slots. ``frozen=True`` reads ``bank.detach()``: no gradient can reach
  the bank, whatever its ``requires_grad``.
- :class:`GatedFusion` adds the recalled memory to the deepest hidden state
  through a learned sigmoid channel gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MotionQuery(nn.Module):
    """(B, T, C, H, W) clip -> (B, H / (p 2^downs), W / (p 2^downs), dim) query.

    H and W must be multiples of ``patch * 2^downs``. T may be 1 (then no motion term).
    """

    def __init__(self, in_channels: int, dim: int, patch: int, downs: int, radius: int) -> None:
        super().__init__()
        self.radius = radius
        width = max(dim // 2, 8)
        layers: list[nn.Module] = [nn.Conv2d(2 * in_channels, width, kernel_size=patch, stride=patch), nn.GELU()]
        for i in range(downs):
            layers += [nn.Conv2d(width if i == 0 else dim, dim, kernel_size=3, stride=2, padding=1), nn.GELU()]
        layers.append(nn.Conv2d(width if downs == 0 else dim, dim, kernel_size=1))
        self.frame_encoder = nn.Sequential(*layers)
        side = 2 * radius + 1
        dy, dx = torch.meshgrid(torch.arange(side) - radius, torch.arange(side) - radius, indexing="ij")
        self.register_buffer("displacements", torch.stack([dy, dx]).flatten(1).float(), persistent=False)  # (2, K)
        self.motion_proj = nn.Conv2d(side * side + 2, dim, kernel_size=1)  # [match probabilities; flow] -> dim
        self.temporal = nn.Sequential(
            nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim),  # depthwise over (T, h, w)
            nn.GELU(),
            nn.Conv3d(dim, dim, kernel_size=1),
        )
        self.norm = nn.LayerNorm(dim)

    def motion(self, feats: Tensor) -> Tensor:
        """(B, T, D, h, w) features -> (B, T-1, D, h, w) motion features between frames t-1 and t."""
        B, T, D, h, w = feats.shape
        r, side = self.radius, 2 * self.radius + 1
        feats32 = feats.float()  # the cost volume sums D products: keep fp16 from overflowing
        prev = feats32[:, :-1].reshape(-1, D, h, w)  # (B(T-1), D, h, w)
        nxt = F.pad(feats32[:, 1:].reshape(-1, D, h, w), (r, r, r, r))
        # local cost volume, one map per displacement (a loop over (2r+1)^2 shifts, not over pixels)
        cost = torch.stack(
            [(prev * nxt[:, :, dy : dy + h, dx : dx + w]).sum(dim=1) for dy in range(side) for dx in range(side)],
            dim=1,
        ) / math.sqrt(D)  # (B(T-1), K, h, w)
        probs = torch.softmax(cost, dim=1)
        flow = torch.einsum("nkhw,ck->nchw", probs, self.displacements)  # (B(T-1), 2, h, w): soft-argmax (dy, dx)
        out = self.motion_proj(torch.cat([probs, flow], dim=1).to(feats.dtype))
        return out.view(B, T - 1, -1, h, w)

    def forward(self, clip: Tensor) -> Tensor:
        B, T, C, H, W = clip.shape
        diffs = torch.cat([torch.zeros_like(clip[:, :1]), clip[:, 1:] - clip[:, :-1]], dim=1)  # (B, T, C, H, W)
        frames = torch.cat([clip, diffs], dim=2).reshape(B * T, 2 * C, H, W)
        feats = self.frame_encoder(frames)
        feats = feats.view(B, T, *feats.shape[1:])  # (B, T, D, h, w)
        if T > 1:  # a shape, not a value: no host sync
            motion = self.motion(feats)
            feats = feats + torch.cat([torch.zeros_like(motion[:, :1]), motion], dim=1)
        z = self.temporal(feats.transpose(1, 2))  # (B, D, T, h, w)
        return self.norm(z.mean(dim=2).permute(0, 2, 3, 1))  # (B, h, w, D)


class MemoryBank(nn.Module):
    """A learnable bank of ``slots`` x ``dim`` addressed per spatial location by cosine similarity."""

    def __init__(self, slots: int, dim: int) -> None:
        super().__init__()
        self.bank = nn.Parameter(torch.randn(slots, dim) / math.sqrt(dim))  # (S, D)
        self.query_proj = nn.Linear(dim, dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))  # sharpness of the addressing

    def forward(self, query: Tensor, frozen: bool) -> Tensor:
        """query (B, h, w, D) -> recalled memory (B, h, w, D). ``frozen``: the bank is read detached."""
        bank = self.bank.detach() if frozen else self.bank
        q = F.normalize(self.query_proj(query).float(), dim=-1)
        similarity = q @ F.normalize(bank.float(), dim=-1).T  # (B, h, w, S), cosine
        weights = torch.softmax(similarity * self.log_temperature.exp(), dim=-1)
        return (weights @ bank.float()).to(query.dtype)  # (B, h, w, D)


class GatedFusion(nn.Module):
    """h + g * W m, with a sigmoid channel gate g = sigmoid(Linear([mean h; mean W m])) of shape (B, 1, 1, C)."""

    def __init__(self, dim: int, memory_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(memory_dim, dim)
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, h: Tensor, memory: Tensor) -> Tensor:
        """h (B, h, w, C) hidden state; memory (B, h, w, C_mem) -> fused hidden state (B, h, w, C)."""
        m = self.proj(memory)  # (B, h, w, C)
        gate = torch.sigmoid(self.gate(torch.cat([h.mean(dim=(1, 2)), m.mean(dim=(1, 2))], dim=-1)))  # (B, C)
        return h + gate[:, None, None, :] * m
