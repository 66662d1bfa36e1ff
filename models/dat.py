"""Deformable window attention in the spirit of DAT (Xia et al., CVPR 2022).

Per block, for each of ``groups`` channel groups:

1. queries q = W_q x;
2. an offset network (depthwise k x k conv -> GELU -> 1x1 projection to 2 channels)
   reads the group's queries and predicts an offset (dx, dy) for the
   reference point of every token, bounded by tanh to +-offset_range tokens;
   ``sampling = "window"`` (the reference DAT-Swin) then clamps the sampling
   point into the query's own (shifted) window, ``"global"`` lets it land
   anywhere on the map (zeros outside);
3. the group's channels of x are sampled bilinearly (F.grid_sample) at
   reference + offset, and keys/values are projected from the samples;
4. windows (optionally cyclically shifted, as in Swin) partition queries and
   sampled keys alike, so every query of a window attends to the same set of
   deformed keys: the window's reference points moved by their offsets;
5. position (``pos``): ``relative`` (below), ``absolute`` / ``sincos`` (an
   embedding per window position added to the tokens before sampling, so the
   sampled keys carry interpolated positions) or ``rotary`` (queries rotated by
   their position, keys by their sampled, continuous position). The relative-position bias is continuous: a learnable table over
   displacements in [-(w-1), w-1]^2 is sampled bilinearly (again grid_sample)
   at the displacement between the query's position and the key's sampled
   position, so it stays defined when offsets move keys off the grid.

With zero offsets this is exactly Swin window attention with a relative
position bias; the offsets let keys land on the relevant regions with the same
complexity (measured on CPU: about twice the time of plain window attention,
for the offset network and the two grid_samples). Reference points are one per
token (stride 1), so the shifted-window mask is the same as Swin's (keys are
labelled by their reference point).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import (
    POSITION_KINDS,
    AddedPosition,
    rotary_2d,
    shift_sizes,
    shifted_window_mask,
    window_attention,
    window_partition,
    window_reverse,
)


class DeformableWindowAttention(nn.Module):
    """(B, H, W, C) -> (B, H, W, C), H and W multiples of ``window``; ``heads`` divisible by ``groups``."""

    # small start: attention begins close to plain window attention
    OFFSET_INIT_STD = 0.01
    # a model-wide init (models.swinlstm._init_weights, applied to every Linear) calls reset_parameters
    # on modules that set this, after their children: the offset head keeps this init, not Swin's
    owns_init = True

    def __init__(
        self,
        dim: int,
        heads: int,
        window: int,
        shifted: bool,
        groups: int,
        offset_range: float,
        offset_kernel: int,
        dropout: float = 0.0,
        sampling: str = "global",
        pos: str = "relative",
    ) -> None:
        super().__init__()
        if sampling not in ("window", "global"):
            raise ValueError(f"model.dat.sampling: unknown {sampling!r}; window or global")
        if pos not in POSITION_KINDS:
            raise ValueError(f"model.pos: unknown position encoding {pos!r}; one of {', '.join(POSITION_KINDS)}")
        self.heads, self.window, self.shifted, self.groups = heads, window, shifted, groups
        self.offset_range, self.dropout, self.sampling, self.pos = offset_range, dropout, sampling, pos
        group_dim = dim // groups
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        # shared by all groups, as in DAT: the groups differ by their channels, not by weights
        self.offset_conv = nn.Conv2d(group_dim, group_dim, offset_kernel, padding=offset_kernel // 2, groups=group_dim)
        self.offset_head = nn.Linear(group_dim, 2, bias=False)  # the 1x1 conv, channels-last: -> (dx, dy)
        self.reset_parameters()
        self.added = AddedPosition(pos, dim, window) if pos in ("absolute", "sincos") else None
        if pos == "relative":
            self.bias_table = nn.Parameter(torch.zeros(heads, 2 * window - 1, 2 * window - 1))  # (nh, dy, dx)
            nn.init.trunc_normal_(self.bias_table, std=0.02)

    def reset_parameters(self) -> None:
        """The offset head's own initialisation: normal with std OFFSET_INIT_STD (the offsets start near 0)."""
        nn.init.normal_(self.offset_head.weight, std=self.OFFSET_INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        G, nh, ws = self.groups, self.heads, self.window
        N, nW = ws * ws, (H // ws) * (W // ws)
        sh, sw = shift_sizes(H, W, ws, self.shifted)
        in_window = self.sampling == "window"
        if self.added is not None:  # before any roll: positions belong to the unshifted windows' grid
            x = self.added(x)
        if in_window and (sh or sw):  # window sampling: work in the shifted frame, where the windows are
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))

        q = self.q(x)  # (B, H, W, C)
        q_groups = q.permute(0, 3, 1, 2).reshape(B * G, C // G, H, W)
        hidden = F.gelu(self.offset_conv(q_groups)).permute(0, 2, 3, 1)  # (B*G, H, W, C/G)
        offsets = torch.tanh(self.offset_head(hidden).float()) * self.offset_range  # (B*G, H, W, 2), (dx, dy) tokens
        cols = torch.arange(W, device=x.device, dtype=torch.float32)
        rows = torch.arange(H, device=x.device, dtype=torch.float32)
        ref = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)  # (H, W, 2): token centres (x, y)
        pos = ref + offsets  # (B*G, H, W, 2): where each group samples its keys, (x, y) tokens
        if in_window:  # keep every key inside its query's window (the reference's per-window sampling)
            low = torch.div(ref, ws, rounding_mode="floor") * ws  # (H, W, 2): the window's first token
            pos = torch.clamp(pos, min=low, max=low + (ws - 1))

        # bilinear sampling in fp32 (positions need the precision; grid_sample wants equal dtypes);
        # grid_sample's [-1, 1] coordinates with align_corners=False: token i -> (2i + 1) / size - 1
        grid = torch.stack([(2 * pos[..., 0] + 1) / W - 1, (2 * pos[..., 1] + 1) / H - 1], dim=-1)
        x_groups = x.permute(0, 3, 1, 2).reshape(B * G, C // G, H, W)
        sampled = F.grid_sample(x_groups.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.to(x.dtype).reshape(B, C, H, W).permute(0, 2, 3, 1)  # (B, H, W, C)
        k, v = self.kv(sampled).chunk(2, dim=-1)  # each (B, H, W, C)

        if not in_window and (sh or sw):  # global sampling, shifted windows: roll queries, keys, positions together
            q, k, v, pos = (torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) for t in (q, k, v, pos))
            ref = torch.roll(ref, shifts=(-sh, -sw), dims=(0, 1))

        def heads_of(t: Tensor) -> Tensor:  # (B, H, W, C) -> (B*nW, nh, N, C/nh)
            return window_partition(t, ws).view(-1, N, nh, C // nh).transpose(1, 2)

        q_pos = window_partition(ref[None], ws)  # (nW, N, 2), (x, y)
        k_pos = window_partition(pos, ws).view(B * G, nW, N, 2)
        qh, kh = heads_of(q), heads_of(k)
        bias = None
        if self.pos == "relative":  # continuous relative-position bias from query-to-key displacements
            disp = q_pos[None, :, :, None, :] - k_pos[:, :, None, :, :]  # (B*G, nW, Nq, Nk, 2), (dx, dy) tokens
            table_grid = (disp / max(ws - 1, 1)).view(B * G, nW * N, N, 2)  # table spans +-(w-1) tokens
            table = self.bias_table.view(G, nh // G, 2 * ws - 1, 2 * ws - 1).repeat(B, 1, 1, 1)
            bias = F.grid_sample(table.float(), table_grid, mode="bilinear", padding_mode="border", align_corners=True)
            bias = bias.view(B, G, nh // G, nW, N, N).permute(0, 3, 1, 2, 4, 5).reshape(B * nW, nh, N, N)
        elif self.pos == "rotary":  # queries at their token, keys at their sampled (continuous) position
            hd = C // nh
            qh = rotary_2d(qh.view(B, nW, nh, N, hd), q_pos[:, None, :, (1, 0)]).view(B * nW, nh, N, hd)
            k_rows_cols = k_pos.view(B, G, nW, N, 2).permute(0, 2, 1, 3, 4)[:, :, :, None, :, (1, 0)]
            kh = rotary_2d(kh.view(B, nW, G, nh // G, N, hd), k_rows_cols).view(B * nW, nh, N, hd)
        mask = shifted_window_mask(H, W, ws, sh, sw, x.device) if sh or sw else None  # (nW, N, N)
        out = window_attention(qh, kh, heads_of(v), bias, mask, self.dropout if self.training else 0.0)
        out = window_reverse(self.proj_drop(self.proj(out.transpose(1, 2).reshape(-1, N, C))), ws, H, W)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out  # (B, H, W, C)
