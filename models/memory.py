"""Long-term motion memory (after LMC-Memory, Lee et al. 2021, and DATSwinLSTM-D-Memory): query, bank, read, fusion.

- :class:`MotionQuery` turns a clip of any length T >= 1 into a query map at
  the backbone's bottom token grid: a per-frame conv stack over each frame and
  its difference to the previous frame, a MotionSqueeze-style motion module
  (normalised correlation between the features of consecutive frames t-1 and t
  over a (2r+1)^2 window -> softmax -> soft-argmax flow and a confidence), then
  a separable 3D conv and mean pooling over time. The memory model holds two
  of them: a *context* encoder for the long clip (phase 1) and a *matching*
  encoder for the short input (phase 2, inference).
- :class:`MemoryBank` holds the learnable slots (slots x dim) and reads them
  per query token, with ``read = "attention"`` (:class:`AttentionRead`, the
  reference) or ``"cosine"`` (:class:`CosineRead`, LMC-Memory). ``frozen=True``
  reads ``bank.detach()``: no gradient can reach the bank, whatever its
  ``requires_grad``.
- Fusions of the recalled map into the backbone (``model.memory.fusion``):
  :class:`ReferenceFusion` (the deepest down cell's state, per-token gate),
  :class:`GatedFusion`, :class:`ConcatFusion`, :class:`CrossAttentionFusion`
  (the bottom up cell's hidden state).

Nothing here normalises an exactly-zero vector with an unbounded gain: the
correlation's L2 norm has a floor (:func:`unit`), the conv encoders keep
PyTorch's default (non-zero) biases, so an all-zero clip gives a non-constant
query (an exactly constant token would make a LayerNorm amplify the gradient
by 1 / sqrt(eps); see models.blocks.PatchEmbed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# squared-norm floor of unit(): the gradient of x / |x| is at most 1 / sqrt(UNIT_EPS) = 1000 at x = 0, once
UNIT_EPS = 1e-6


def unit(x: Tensor, dim: int) -> Tensor:
    """x / sqrt(|x|^2 + eps) along ``dim``: L2 normalisation whose gradient stays bounded at x = 0."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + UNIT_EPS)


class MotionQuery(nn.Module):
    """(B, T, C, H, W) clip -> (B, H / (p 2^downs), W / (p 2^downs), dim) query.

    H and W must be multiples of ``patch * 2^downs``. T may be 1 (then no motion term).

    Checked against the published code (DATSwinLSTM_D_Memory.py / MotionSqueeze.py): there the per-frame
    features (B*T, C, h, w) become (B, C, T, h, w) by a ``view`` without a permute, and MotionSqueeze's
    refined (B*T, C, h, w) output is viewed back the same way, so "time" and "channels" are mixed and
    the correlation does not compare consecutive frames of one sample. Here every reshape keeps the
    (sample, time) order and time moves by ``transpose``; tests recover a known shift and check that a
    motion between frames t-1 and t of one sample shows up exactly there.
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
        # sharpness of the matching softmax over cosine similarities (MotionSqueeze: a fixed 100 on its
        # correlation); learned here, starting at 10
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.motion_proj = nn.Conv2d(3, dim, kernel_size=1)  # [flow (dy, dx) / radius; confidence] -> dim
        self.temporal = nn.Sequential(
            nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim),  # depthwise over (T, h, w)
            nn.GELU(),
            nn.Conv3d(dim, dim, kernel_size=1),
        )
        self.norm = nn.LayerNorm(dim)

    def flow(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, D, h, w) features -> flow (B, T-1, 2, h, w) and confidence (B, T-1, 1, h, w), frames t-1 -> t.

        MotionSqueeze's matching: cosine similarity of each token of frame t-1 with the tokens of frame t
        within +-radius, softmax (a probability per displacement), soft-argmax flow = the expected
        displacement (dy, dx) in tokens, confidence = the largest probability. A feature that moves by
        (dy, dx) between t-1 and t gives flow (dy, dx).
        """
        B, T, D, h, w = feats.shape
        r, side = self.radius, 2 * self.radius + 1
        feats32 = unit(feats.float(), dim=2)  # fp32: the correlation sums D products
        prev = feats32[:, :-1].reshape(-1, D, h, w)  # (B(T-1), D, h, w): frame t-1
        nxt = F.pad(feats32[:, 1:].reshape(-1, D, h, w), (r, r, r, r))  # frame t, zero outside the map
        # local correlation, one map per displacement (a loop over (2r+1)^2 shifts, not over pixels)
        corr = torch.stack(
            [(prev * nxt[:, :, dy : dy + h, dx : dx + w]).sum(dim=1) for dy in range(side) for dx in range(side)],
            dim=1,
        )  # (B(T-1), K, h, w), cosine in [-1, 1]
        probs = torch.softmax(corr * self.log_temperature.exp(), dim=1)
        flow = torch.einsum("nkhw,ck->nchw", probs, self.displacements)  # soft-argmax (dy, dx)
        confidence = probs.amax(dim=1, keepdim=True)
        return flow.view(B, T - 1, 2, h, w), confidence.view(B, T - 1, 1, h, w)

    def motion(self, feats: Tensor) -> Tensor:
        """(B, T, D, h, w) features -> (B, T-1, D, h, w) motion features between frames t-1 and t."""
        B, T, D, h, w = feats.shape
        flow, confidence = self.flow(feats)
        motion = torch.cat([flow / self.radius, confidence], dim=2).view(B * (T - 1), 3, h, w)
        return self.motion_proj(motion.to(feats.dtype)).view(B, T - 1, D, h, w)

    def forward(self, clip: Tensor) -> Tensor:
        B, T, C, H, W = clip.shape
        diffs = torch.cat([torch.zeros_like(clip[:, :1]), clip[:, 1:] - clip[:, :-1]], dim=1)  # (B, T, C, H, W)
        frames = torch.cat([clip, diffs], dim=2).reshape(B * T, 2 * C, H, W)  # sample-major: (b, t) -> b * T + t
        feats = self.frame_encoder(frames)
        feats = feats.view(B, T, *feats.shape[1:])  # (B, T, D, h, w): the same (b, t) order, no time/channel mix
        if T > 1:  # a shape, not a value: no host sync
            motion = self.motion(feats)
            feats = feats + torch.cat([torch.zeros_like(motion[:, :1]), motion], dim=1)
        z = self.temporal(feats.transpose(1, 2))  # (B, D, T, h, w): a permute, not a view
        return self.norm(z.mean(dim=2).permute(0, 2, 3, 1))  # (B, h, w, D)


# ------------------------------------------------------------------------ reads
def _heads(t: Tensor, heads: int) -> Tensor:
    """(B, L, D) -> (B, heads, L, D / heads)."""
    B, L, D = t.shape
    return t.view(B, L, heads, D // heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """(B, heads, L, hd) -> (B, L, heads * hd)."""
    B, nh, L, hd = t.shape
    return t.transpose(1, 2).reshape(B, L, nh * hd)


class CosineRead(nn.Module):
    """LMC-Memory's read: softmax over slots of temperature x cosine(Linear(query), slot), weighted sum of slots."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(dim, dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))  # sharpness of the addressing

    def forward(self, query: Tensor, bank: Tensor) -> Tensor:
        """query (B, h, w, D), bank (S, D) -> (B, h, w, D)."""
        q = unit(self.query_proj(query).float(), dim=-1)
        similarity = q @ unit(bank.float(), dim=-1).T  # (B, h, w, S), cosine
        weights = torch.softmax(similarity * self.log_temperature.exp(), dim=-1)
        return (weights @ bank.float()).to(query.dtype)


class AttentionRead(nn.Module):
    """The reference's transformer read of the bank, with the query used for addressing only.

    Addressing: x = query + position embedding; x += SelfAttention(LN x) (the query tokens see each
    other); per head, weights w = softmax(cross_q(LN x) . cross_k(LN bank)) over the slots. Recall:
    c = cross_out(w @ cross_v(bank)), out = sigmoid(LN(c + FeedForward(c))), bounded to 0-1. The
    position embedding is a learned (POS_GRID x POS_GRID) table resized bilinearly to the query grid
    (the reference's is a fixed 6 x 6: it only works at 384 x 384).

    Unlike the reference, no residual carries x (the query) past the cross-attention: there the output
    is sigmoid(LN(x + ...)), so the query's content reaches the fused memory directly, and in phase 1
    the query is built from the long clip, target frames included: the read would hand the future to
    the backbone (a shortcut phase 2 and inference cannot take). Here the output depends on the query
    only through w: a bank of identical slots recalls the same memory for every query.
    """

    POS_GRID = 8

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.pos = nn.Parameter(torch.zeros(1, dim, self.POS_GRID, self.POS_GRID))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.norm_self = nn.LayerNorm(dim)
        self.self_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.self_out = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_bank = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, dim, bias=False)
        self.cross_k = nn.Linear(dim, dim, bias=False)
        self.cross_v = nn.Linear(dim, dim, bias=False)
        self.cross_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.norm_out = nn.LayerNorm(dim)

    def address(self, query: Tensor, bank: Tensor) -> Tensor:
        """query (B, h, w, D), bank (S, D) -> attention weights (B, heads, h * w, S), each row a distribution."""
        B, h, w, D = query.shape
        p = self.dropout if self.training else 0.0
        pos = F.interpolate(self.pos, size=(h, w), mode="bilinear", align_corners=False)  # (1, D, h, w)
        x = (query + pos.permute(0, 2, 3, 1).to(query.dtype)).reshape(B, h * w, D)
        q, k, v = self.self_qkv(self.norm_self(x)).chunk(3, dim=-1)
        heads = (_heads(t, self.heads) for t in (q, k, v))
        x = x + self.self_out(_merge(F.scaled_dot_product_attention(*heads, dropout_p=p)))
        q = _heads(self.cross_q(self.norm_cross(x)), self.heads)  # (B, nh, L, hd)
        k = _heads(self.cross_k(self.norm_bank(bank.to(x.dtype)))[None], self.heads)  # (1, nh, S, hd)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
        return F.dropout(weights, p) if p else weights

    def values(self, bank: Tensor) -> Tensor:
        """bank (S, D) -> the value-projected slots per head (heads, S, D / heads)."""
        return _heads(self.cross_v(bank)[None], self.heads)[0]

    def recall(self, mixed: Tensor) -> Tensor:
        """(B, heads, L, hd) mixes of value-projected slots -> (B, L, D) memory on 0-1; sees no query."""
        c = self.cross_out(_merge(mixed))
        return torch.sigmoid(self.norm_out(c + self.ff(c)))

    def forward(self, query: Tensor, bank: Tensor) -> Tensor:
        """query (B, h, w, D), bank (S, D) -> (B, h, w, D) on 0-1."""
        B, h, w, D = query.shape
        weights = self.address(query, bank)
        mixed = weights @ self.values(bank.to(weights.dtype))  # (B, nh, L, hd): convex mixes of the slots' values
        return self.recall(mixed).view(B, h, w, D)


class MemoryBank(nn.Module):
    """A learnable bank of ``slots`` x ``dim``, read per query token by ``read`` (attention | cosine)."""

    def __init__(self, slots: int, dim: int, read: str = "cosine", heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.bank = nn.Parameter(torch.randn(slots, dim) / math.sqrt(dim))  # (S, D)
        if read == "attention":
            self.read: nn.Module = AttentionRead(dim, heads, dropout)
        elif read == "cosine":
            self.read = CosineRead(dim)
        else:
            raise ValueError(f"model.memory.read: unknown {read!r}; attention or cosine")

    def forward(self, query: Tensor, frozen: bool) -> Tensor:
        """query (B, h, w, D) -> recalled memory (B, h, w, D). ``frozen``: the bank is read detached."""
        return self.read(query, self.bank.detach() if frozen else self.bank)


# ---------------------------------------------------------------------- fusions
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


class ConcatFusion(nn.Module):
    """h + Linear([h; m]) per token: the memory concatenated to the state, mixed back to C channels."""

    def __init__(self, dim: int, memory_dim: int) -> None:
        super().__init__()
        self.mix = nn.Linear(dim + memory_dim, dim)

    def forward(self, h: Tensor, memory: Tensor) -> Tensor:
        return h + self.mix(torch.cat([h, memory.to(h.dtype)], dim=-1))


class CrossAttentionFusion(nn.Module):
    """h + Out(MultiHeadAttention(queries LN h, keys/values the memory tokens)), over the whole grid."""

    def __init__(self, dim: int, memory_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(memory_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, h: Tensor, memory: Tensor) -> Tensor:
        B, gh, gw, C = h.shape
        q = _heads(self.q(self.norm(h)).reshape(B, gh * gw, C), self.heads)
        k, v = (_heads(t.reshape(B, -1, C), self.heads) for t in self.kv(memory.to(h.dtype)).chunk(2, dim=-1))
        return h + self.out(_merge(F.scaled_dot_product_attention(q, k, v))).view(B, gh, gw, C)


class ReferenceFusion(nn.Module):
    """The reference's fusion into a cell state: c <- Linear([c; g * m]), g = sigmoid(MLP([c; m])) per token.

    The memory (B, h, w, C_mem) is first brought to the state's grid, ``scale`` times finer, by a
    Linear to scale^2 x C channels and a pixel shuffle (the reference: PatchExpanding steps and a
    Linear). Unlike the reference, ``fuse`` starts as the identity on c (its memory half small), so
    the first forecast steps do not scramble the cell state before the gate has learned anything.
    """

    GATE_HIDDEN = 16  # the reference's bottleneck

    def __init__(self, dim: int, memory_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(memory_dim, scale * scale * dim)
        self.gate = nn.Sequential(
            nn.Linear(2 * dim, self.GATE_HIDDEN), nn.ReLU(), nn.Linear(self.GATE_HIDDEN, dim), nn.Sigmoid()
        )
        self.fuse = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            nn.init.trunc_normal_(self.fuse.weight, std=0.02)
            self.fuse.weight[:, :dim] = torch.eye(dim)
            self.fuse.bias.zero_()

    def memory_map(self, memory: Tensor) -> Tensor:
        """(B, h, w, C_mem) -> (B, h * scale, w * scale, C)."""
        B, h, w, _ = memory.shape
        s = self.scale
        m = self.expand(memory).view(B, h, w, s, s, -1).permute(0, 1, 3, 2, 4, 5)
        return m.reshape(B, h * s, w * s, -1)

    def forward(self, c: Tensor, memory: Tensor) -> Tensor:
        """c (B, H, W, C) cell state; memory (B, H / scale, W / scale, C_mem) -> the new cell state."""
        m = self.memory_map(memory).to(c.dtype)
        g = self.gate(torch.cat([c, m], dim=-1))
        return self.fuse(torch.cat([c, g * m], dim=-1))
