"""Building blocks shared by the Swin-style recurrent models.

Token maps are channels-last, ``(B, H, W, C)``, where H and W count tokens
(pixels / patch_size). Window helpers work on any H, W that are multiples of
the window side; nothing loops over pixels or heads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Added to the logits of key/query pairs that come from different regions of a
# cyclically shifted map. Finite (not -inf) so fp16 stays NaN-free; softmax
# still gives them ~exp(-100) = 0 weight.
MASK_VALUE = -100.0


# ----------------------------------------------------------------- regularisers
class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU -> Linear, with dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


# ------------------------------------------------------------------- windowing
def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window * window, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)


def shift_sizes(height: int, width: int, window: int, shifted: bool) -> tuple[int, int]:
    """Cyclic shift per axis for a shifted-window block; 0 along an axis that holds a single window."""
    if not shifted:
        return 0, 0
    return (window // 2 if height > window else 0), (window // 2 if width > window else 0)


def shifted_window_mask(
    height: int, width: int, window: int, shift_h: int, shift_w: int, device: torch.device
) -> Tensor:
    """Additive mask (nW, N, N) for a map rolled by (-shift_h, -shift_w); N = window^2.

    After the roll, a window at the bottom/right edge holds tokens from up to
    three regions that were not neighbours; pairs from different regions get
    :data:`MASK_VALUE`. Built from shapes with tensor ops only (no host sync).
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    # region label per row/col: 0 = untouched, 1 = last window before the seam, 2 = wrapped part
    label_h = (rows >= height - window).long() + (rows >= height - shift_h).long() if shift_h else rows * 0
    label_w = (cols >= width - window).long() + (cols >= width - shift_w).long() if shift_w else cols * 0
    labels = (label_h[:, None] * 3 + label_w[None, :]).view(1, height, width, 1).float()
    labels = window_partition(labels, window).squeeze(-1)  # (nW, N)
    different = labels[:, :, None] != labels[:, None, :]  # (nW, N, N)
    return different.float() * MASK_VALUE


# ------------------------------------------------------------------- attention
def window_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None, dropout_p: float
) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias [+ mask]) v over windows; q, k, v (B*nW, nh, N, hd) -> (B*nW, nh, N, hd).

    ``bias``: (nh, N, N) or (B*nW, nh, N, N), the relative-position bias, or None; ``mask``: (nW, N, N) or None,
    the shifted-window mask, shared by every sample. Windows are ordered sample-major, as
    :func:`window_partition` makes them.

    Two paths with the same result (to float rounding):

    - CPU with autograd on: the attention written out. The learnable bias needs a gradient, and
      PyTorch's fast CPU ``scaled_dot_product_attention`` kernel refuses a mask that requires grad:
      it falls back to a slower composite path with extra checks (measured ~1.3x slower step on the
      Moving-MNIST config). The mask is added by a broadcasting view, not a copy per sample.
    - otherwise (CUDA, or no grad): ``F.scaled_dot_product_attention`` with the summed mask.

    The choice depends on the device type and the grad mode only: static under ``torch.compile``, no sync.
    """
    nh, N = q.shape[1], q.shape[2]
    if bias is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        bias = torch.zeros((), device=q.device, dtype=mask.dtype).expand(nh, N, N)
    if q.device.type == "cpu" and torch.is_grad_enabled():
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias  # (B*nW, nh, N, N)
        if mask is not None:
            attn = (attn.view(-1, mask.shape[0], nh, N, N) + mask[:, None]).view(-1, nh, N, N)
        attn = attn.softmax(dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, dropout_p)
        return attn @ v
    if mask is not None:
        nW = mask.shape[0]
        if bias.ndim == 3:  # (nh, N, N): the same for every window of every sample
            bias = (bias[None] + mask[:, None]).repeat(q.shape[0] // nW, 1, 1, 1)  # (B*nW, nh, N, N)
        else:
            bias = (bias.view(-1, nW, nh, N, N) + mask[:, None]).view(-1, nh, N, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p)


# --------------------------------------------------------- position encodings
POSITION_KINDS = ("relative", "absolute", "sincos", "rotary")
ROTARY_BASE = 100.0  # positions are a few tokens (a window, or a deformed key near it): short wavelengths


def window_coords(window: int) -> Tensor:
    """(N, 2) float (row, col) of each position in a window, row-major (the order of :func:`window_partition`)."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()


def sincos_2d(coords: Tensor, dim: int) -> Tensor:
    """Fixed 2D sin/cos embedding (N, dim) of (N, 2) (row, col) positions; dim % 4 == 0 (half per axis)."""
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    parts = []
    for axis in range(2):
        angle = coords[:, axis, None] * freqs  # (N, dim/4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=-1)


def rotary_2d(t: Tensor, pos: Tensor) -> Tensor:
    """2D rotary position embedding: t (..., N, hd) rotated by pos (..., N, 2) (row, col), hd % 4 == 0.

    The first half of the head channels turns with the row, the second with the column; each half is
    hd/4 rotation pairs at frequencies ROTARY_BASE^(-i / (hd/4)). q.k then depends on positions only
    through their difference: a relative encoding that also holds at the continuous positions of
    deformed keys.
    """
    hd = t.shape[-1]
    quarter = hd // 4
    freqs = ROTARY_BASE ** (-torch.arange(quarter, device=t.device, dtype=torch.float32) / quarter)
    out = []
    for axis in range(2):
        half = t[..., axis * hd // 2 : (axis + 1) * hd // 2].float()
        a, b = half[..., :quarter], half[..., quarter:]
        angle = pos[..., axis, None].float() * freqs  # (..., N, hd/4)
        cos, sin = angle.cos(), angle.sin()
        out += [a * cos - b * sin, a * sin + b * cos]
    return torch.cat(out, dim=-1).to(t.dtype)


class AddedPosition(nn.Module):
    """``absolute`` (learned) or ``sincos`` (fixed) embedding per position in a window, added to the tokens.

    (B, H, W, C) -> (B, H, W, C): every window gets the same (window, window, C) pattern, so it works on
    any map whose sides are multiples of the window (the frame size is not known at construction).
    """

    def __init__(self, kind: str, dim: int, window: int) -> None:
        super().__init__()
        self.window = window
        if kind == "absolute":
            self.table = nn.Parameter(torch.zeros(window, window, dim))
            nn.init.trunc_normal_(self.table, std=0.02)
        elif kind == "sincos":
            self.register_buffer("table", sincos_2d(window_coords(window), dim).view(window, window, dim), False)
        else:
            raise ValueError(f"model.pos: {kind!r} is not an added embedding")

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        ws = self.window
        return (x.view(B, H // ws, ws, W // ws, ws, C) + self.table[:, None].to(x.dtype)).view(B, H, W, C)


class WindowAttention(nn.Module):
    """Swin (shifted) window multi-head self-attention with a position encoding (``pos``, see ModelConfig).

    Promise: (B, H, W, C) -> (B, H, W, C) for H, W multiples of ``window``.
    """

    def __init__(
        self, dim: int, heads: int, window: int, shifted: bool, dropout: float = 0.0, pos: str = "relative"
    ) -> None:
        super().__init__()
        if pos not in POSITION_KINDS:
            raise ValueError(f"model.pos: unknown position encoding {pos!r}; one of {', '.join(POSITION_KINDS)}")
        self.heads, self.window, self.shifted, self.dropout, self.pos = heads, window, shifted, dropout, pos
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.added = AddedPosition(pos, dim, window) if pos in ("absolute", "sincos") else None
        if pos == "relative":
            # one learnable bias per head and per relative offset (dy, dx) in [-(w-1), w-1]^2
            self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
            nn.init.trunc_normal_(self.bias_table, std=0.02)
            coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
            rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
            self.register_buffer("bias_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        if pos == "rotary":
            self.register_buffer("coords", window_coords(window), persistent=False)  # (N, 2)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        ws, nh = self.window, self.heads
        if self.added is not None:  # before the roll: positions belong to the unshifted windows' grid
            x = self.added(x)
        sh, sw = shift_sizes(H, W, ws, self.shifted)
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        qkv = self.qkv(window_partition(x, ws))  # (B*nW, N, 3C)
        q, k, v = qkv.view(qkv.shape[0], ws * ws, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # each (B*nW, nh, N, hd)
        if self.pos == "rotary":
            q, k = rotary_2d(q, self.coords), rotary_2d(k, self.coords)

        bias = self.bias_table[self.bias_index].permute(2, 0, 1) if self.pos == "relative" else None  # (nh, N, N)
        mask = shifted_window_mask(H, W, ws, sh, sw, x.device) if sh or sw else None  # (nW, N, N)
        out = window_attention(q, k, v, bias, mask, self.dropout if self.training else 0.0)  # (B*nW, nh, N, hd)
        out = out.transpose(1, 2).reshape(-1, ws * ws, C)
        x = window_reverse(self.proj_drop(self.proj(out)), ws, H, W)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x


AttentionFactory = Callable[[int, int, bool], nn.Module]
"""(dim, heads, shifted) -> a module mapping (B, H, W, C) -> (B, H, W, C)."""


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN x)); x + DropPath(MLP(LN x))."""

    def __init__(self, dim: int, attention: nn.Module, mlp_ratio: float, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# -------------------------------------------------------------- recurrent cell
class SwinLSTMCell(nn.Module):
    """The SwinLSTM cell (Tang et al. 2023) with pluggable window attention.

    F = Blocks(Linear([LN(X_t); LN(H_{t-1})])), gate = sigmoid(F),
    C_t = gate * (C_{t-1} + tanh F), H_t = gate * tanh(C_t).
    Blocks alternate plain and shifted windows.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        make_attention: AttentionFactory,
        mlp_ratio: float,
        dropout: float,
        drop_paths: list[float],
    ) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_h = nn.LayerNorm(dim)
        self.mix = nn.Linear(2 * dim, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, make_attention(dim, heads, i % 2 == 1), mlp_ratio, dropout, drop_paths[i])
            for i in range(depth)
        )

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: (B, H, W, C); state (H_{t-1}, C_{t-1}) or None (zeros). Returns H_t and (H_t, C_t)."""
        if state is None:
            h, c = torch.zeros_like(x), torch.zeros_like(x)
        else:
            h, c = state
        f = self.mix(torch.cat([self.norm_x(x), self.norm_h(h)], dim=-1))  # (B, H, W, C)
        for block in self.blocks:
            f = block(f)
        gate = torch.sigmoid(f)
        c = gate * (c + torch.tanh(f))
        h = gate * torch.tanh(c)
        return h, (h, c)


# ------------------------------------------------------- resolution changes
class PatchEmbed(nn.Module):
    """(B, C_in, H, W) pixels -> (B, H/p, W/p, D) tokens: each p x p patch flattened, Linear, LayerNorm.

    The same map as a p x p stride-p convolution, written as space-to-depth + Linear.
    """

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(in_channels * patch * patch, dim)
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the p x p stride-p ``nn.Conv2d`` this stands for (PyTorch's default, as in Swin).

        Weights and bias ~ U(+-1/sqrt(C_in p^2)): the bias makes the token of an all-zero patch a
        non-constant vector. This is the root fix of the non-finite gradients on zero-dominant VIL:
        with a zero bias (the Swin init of a Linear) an all-zero patch gave an exactly zero
        token, every later Linear (zero bias) and LayerNorm (beta 0) kept it exactly zero, and the
        gradient of LayerNorm at an exactly constant input is 1/sqrt(eps) ~ 316 times its output's, so a
        chain of some 30 of them overflowed float32. A non-degenerate token at the entry breaks the
        chain at its only source; it is the published SwinLSTM's and DAT's own (Conv2d) initialisation,
        so nothing is clamped and no normalisation is changed. A larger LayerNorm eps would not do:
        at eps 1e-3 the chain still gains ~32x per norm (measured inf / 5e8).
        """
        self.proj.reset_parameters()  # nn.Linear's default init = nn.Conv2d's for the same fan-in

    def forward(self, x: Tensor) -> Tensor:
        patches = F.pixel_unshuffle(x, self.patch).permute(0, 2, 3, 1)  # (B, H/p, W/p, C_in p^2)
        return self.norm(self.proj(patches))


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C): concatenate each 2 x 2 neighbourhood, LayerNorm, Linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduce(self.norm(x))


class PatchExpanding(nn.Module):
    """(B, H, W, C) -> (B, 2H, 2W, C/2): Linear C -> 2C, rearranged into a 2 x 2 neighbourhood, LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = self.expand(x).view(B, H, W, 2, 2, C // 2).permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, C // 2)
        return self.norm(x)


class PixelHead(nn.Module):
    """(B, H/p, W/p, D) tokens -> (B, C_out, H, W) pixels, for ANY patch size p.

    LayerNorm, Linear D -> C_out * p^2, then pixel shuffle by exactly p: the
    inverse of :class:`PatchEmbed`, so the output always matches the input size;
    ``sigmoid`` then bounds it to 0-1.
    """

    # sigmoid head: the initial output bias, sigmoid(-3) = 0.047, near the mean of mostly-empty VIL rather
    # than 0.5 everywhere (measured: a 0.5 start spends the first steps just darkening the whole frame)
    SIGMOID_BIAS = -3.0

    def __init__(self, dim: int, out_channels: int, patch: int, sigmoid: bool = False, residual: bool = False) -> None:
        super().__init__()
        self.patch, self.sigmoid, self.residual = patch, sigmoid, residual
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_channels * patch * patch)

    def reset_parameters(self) -> None:
        """Called by the backbone's init after the Swin init of the Linear: the output start.

        residual (model.residual): the head outputs a change to add to the last input frame; weight and
        bias zero, so the change starts at exactly 0 (the model starts as persistence). The weight still
        gets a gradient (the normed tokens), so the trunk below starts learning after the first step.
        Otherwise the sigmoid head's bias starts at SIGMOID_BIAS.
        """
        if self.residual:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        elif self.sigmoid:
            nn.init.constant_(self.proj.bias, self.SIGMOID_BIAS)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(self.norm(x)).permute(0, 3, 1, 2)  # (B, C_out * p^2, H/p, W/p)
        x = F.pixel_shuffle(x, self.patch)  # (B, C_out, H, W)
        if not self.sigmoid:
            return x
        if self.residual:  # a change in -1..1, 0 at a zero pre-activation
            return 2.0 * torch.sigmoid(x) - 1.0
        return torch.sigmoid(x)  # model.head: sigmoid bounds to 0-1 (the reference)
