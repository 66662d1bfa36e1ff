"""SwinLSTM-D (Tang et al., ICCV 2023): a U-shaped stack of SwinLSTM cells.

One recurrent step on frame x_t (B, C, H, W):

    tokens = PatchEmbed(x_t)                        # (B, H/p, W/p, D)
    down stage i (i = 0 .. S-1): SwinLSTM cell at D * 2^i channels (heads[i]),
        [optional, memory fusion "reference", deepest down cell at forecast steps: its incoming
         cell state c is fused with the memory first]
        output kept as skip i, then PatchMerging -> D * 2^(i+1) channels, half the grid
    up stage j (j = 0 .. S-1, deepest first): SwinLSTM cell at D * 2^(S-j) channels
        (heads[S-1-j]: the bottom, D * 2^S, uses heads[-1]), then
        PatchExpanding -> D * 2^(S-j-1) channels, twice the grid [+ skip S-1-j if model.skips]
    [optional, other memory fusions, after up cell 0: fuse a memory map into the bottom hidden
     state, grid (H / (p 2^S), W / (p 2^S)), D * 2^S channels]
    prediction of x_{t+1} = PixelHead(tokens)       # (B, C, H, W), any patch size [sigmoid if model.head]

The resolution layout is the paper's and the public code's (SwinLSTM_D.py,
DATSwinLSTM_D_Memory.py): a merge after every down stage and an expand after
every up stage, so the up cells run one level below the down cells. The
published models have NO U-Net skips; ``model.skips: true`` adds them (ours,
not the paper's). Every cell keeps its own (H, C) state across steps. Decoding
is autoregressive: after the T_in inputs the model's own prediction is fed back
for the remaining out_len - 1 steps. Spatial constraint: H and W multiples of
patch_size * window_size * 2^S (see ModelConfig.spatial_multiple): the bottom
grid must tile into windows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import Forecaster, check_input
from models.blocks import (
    AttentionFactory,
    PatchEmbed,
    PatchExpanding,
    PatchMerging,
    PixelHead,
    SwinLSTMCell,
    WindowAttention,
)
from models.config import ModelConfig
from models.motion import Evolution, FlowHead, build_prior
from models.registry import register

CellState = tuple[Tensor, Tensor]


class SwinLSTMD(nn.Module):
    """The SwinLSTM-D backbone, with pluggable attention and an optional deepest-state fusion.

    ``make_attention(dim, heads, shifted)`` builds each block's attention;
    ``deep_fusion(state, memory)``, if given, fuses a memory map (B, h, w, C_mem)
    into the recurrent state. ``fusion_site = "up"``: the bottom up cell's hidden
    state (B, H/(p 2^S), W/(p 2^S), D 2^S) after every step, memory on the same
    grid. ``"down"`` (the reference): the deepest down cell's incoming cell state
    c (B, H/(p 2^(S-1)), W/(p 2^(S-1)), D 2^(S-1)) at forecast steps only.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        make_attention: AttentionFactory,
        deep_fusion: nn.Module | None = None,
        fusion_site: str = "up",
    ):
        super().__init__()
        if fusion_site not in ("up", "down"):
            raise ValueError(f"fusion_site must be 'up' or 'down', got {fusion_site!r}")
        self.fusion_site = fusion_site
        self.cfg = cfg
        S, D = cfg.stages, cfg.embed_dim
        # stochastic depth rises linearly over all blocks, in the order data meets them
        rates = iter(torch.linspace(0, cfg.drop_path, sum(cfg.depths_down) + sum(cfg.depths_up)).tolist())

        def cell(dim: int, depth: int, heads: int) -> SwinLSTMCell:
            paths = [next(rates) for _ in range(depth)]
            return SwinLSTMCell(dim, depth, heads, make_attention, cfg.mlp_ratio, cfg.dropout, paths)

        self.embed = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.down = nn.ModuleList(cell(D * 2**i, cfg.depths_down[i], cfg.heads[i]) for i in range(S))
        self.merge = nn.ModuleList(PatchMerging(D * 2**i) for i in range(S))
        self.up = nn.ModuleList(cell(D * 2 ** (S - j), cfg.depths_up[j], cfg.heads[S - 1 - j]) for j in range(S))
        self.expand = nn.ModuleList(PatchExpanding(D * 2 ** (S - j)) for j in range(S))
        # model.motion: the flow head (below) draws the forecast instead; no pixel head
        self.head = (
            None
            if cfg.motion
            else PixelHead(D, cfg.in_channels, cfg.patch_size, sigmoid=cfg.head == "sigmoid", residual=cfg.residual)
        )
        self.apply(_init_weights)
        self.deep_fusion = deep_fusion  # after init: it keeps its own initialisation
        # model.motion: a flow per forecast step from the head's tokens (zero at the start, see models.motion)
        self.flow_head = FlowHead(D, cfg.patch_size, channels_last=True) if cfg.motion else None
        self.motion_prior = build_prior(cfg)  # model.prior: the flow the network's is added to

    def step(
        self, frame: Tensor, states: list[CellState | None], memory: Tensor | None, forecast: bool = True
    ) -> tuple[Tensor, list[CellState | None]] | tuple[Tensor, list[CellState | None], Tensor]:
        """One recurrent step: frame (B, C, H, W) -> prediction of the next frame (B, C, H, W).

        ``forecast``: this step predicts a target frame (the last input's step or a fed-back one).
        With ``model.motion`` a forecast step also returns its flow (B, 2, H, W) (see :meth:`forward`).
        """
        S = self.cfg.stages
        fuse = self.deep_fusion is not None and memory is not None
        new_states: list[CellState | None] = []
        x = self.embed(frame)  # (B, H/p, W/p, D)
        skips = []
        for i, cell in enumerate(self.down):
            state = states[i]
            if fuse and forecast and self.fusion_site == "down" and i == S - 1:
                # the reference: the deepest down cell's state c <- Linear([c; g m]) at forecast steps; fused
                # before the cell runs, so the memory shapes this step's forecast (the reference fuses after
                # the step: its first forecast frame never sees the memory, its last fusion is never used)
                h, c = state if state is not None else (torch.zeros_like(x), torch.zeros_like(x))
                state = (h, self.deep_fusion(c, memory))
            x, state = cell(x, state)  # (B, H/(p 2^i), W/(p 2^i), D 2^i)
            new_states.append(state)
            if self.cfg.skips:
                skips.append(x)
            x = self.merge[i](x)  # (B, H/(p 2^(i+1)), W/(p 2^(i+1)), D 2^(i+1))
        for j, cell in enumerate(self.up):
            x, state = cell(x, states[S + j])  # (B, H/(p 2^(S-j)), W/(p 2^(S-j)), D 2^(S-j))
            if j == 0 and fuse and self.fusion_site == "up":
                x = self.deep_fusion(x, memory)  # memory enters the deepest recurrent state
                state = (x, state[1])
            new_states.append(state)
            x = self.expand[j](x)  # (B, 2h, 2w, C/2)
            if self.cfg.skips:  # ours, not the paper's: U-Net skips from the down path
                x = x + skips[S - 1 - j]
        if self.flow_head is not None:  # model.motion: no pixel head; the flow head only at forecast steps
            return x, new_states, (self.flow_head(x) if forecast else None)
        return self.head(x), new_states

    def forward(self, x: Tensor, out_len: int, memory: Tensor | None = None) -> Tensor:
        """(B, T_in, C, H, W) -> (B, out_len, C, H, W), autoregressive after the inputs."""
        T = x.shape[1]
        states: list[CellState | None] = [None] * (2 * self.cfg.stages)
        preds: list[Tensor] = []
        pred = x[:, 0]
        anchor = x[:, -1]  # model.residual: forecasts are the last input frame + the head's change
        evolution = None
        if self.flow_head is not None:
            evolution = Evolution(
                anchor, self.motion_prior(x) if self.motion_prior is not None else None, self.cfg.inflow
            )
        for t in range(T + out_len - 1):
            frame = x[:, t] if t < T else pred  # feed the inputs, then the model's own forecast
            out = self.step(frame, states, memory, forecast=t >= T - 1)  # (B, C, H, W): frame t + 1
            pred, states = out[0], out[1]
            if t >= T - 1:
                if evolution is not None:  # model.motion: the last input advected by the accumulated flow + change
                    pred = evolution.step(out[2])
                    preds.append(pred)
                    continue
                if self.cfg.residual:
                    pred = anchor + pred
                    anchor = pred  # the next step starts from this forecast (motion), unused otherwise
                preds.append(pred)
        return torch.stack(preds, dim=1)


def _init_weights(module: nn.Module) -> None:
    """Swin's initialisation (truncated-normal Linear weights, zero biases), except modules that own theirs.

    ``nn.Module.apply`` visits children first, so a module's own Linears get the Swin init and the
    module is then re-initialised by its ``reset_parameters``: the patch embedding and the pixel head
    (the patch embedding as the convolution it stands for, see :meth:`PatchEmbed.reset_parameters`: a
    non-zero bias), and every module that sets ``owns_init = True`` (the deformable attention's offset
    head, models.dat). With a zero bias in the patch embedding, an all-zero patch (most of a VIL frame)
    stays an exactly zero token through every bias-free Linear and every LayerNorm (beta = 0 at init),
    and each LayerNorm of an exactly constant vector multiplies the gradient by 1/sqrt(eps) ~ 316: on
    all-zero frames the gradient norm overflowed float32 on the first backward.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (PatchEmbed, PixelHead)) or getattr(module, "owns_init", False):
        module.reset_parameters()


@register("swinlstm")
class SwinLSTM(Forecaster):
    """SwinLSTM-D with shifted-window attention and a relative position bias table.

    Uses ``model.embed_dim, patch_size, window_size, depths_down, depths_up,
    heads, mlp_ratio, dropout, drop_path, in_channels, skips, head, pos``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg

        def attention(dim: int, heads: int, shifted: bool) -> nn.Module:
            return WindowAttention(dim, heads, cfg.window_size, shifted, cfg.dropout, cfg.pos)

        self.backbone = SwinLSTMD(cfg, attention)

    def forward(self, x: Tensor, out_len: int, memory_x: Tensor | None = None, phase: int = 2) -> Tensor:
        """(B, T_in, C, H, W) on 0-1 -> (B, out_len, C, H, W); memory_x and phase are ignored."""
        check_input(x, self.cfg, out_len)
        return self.backbone(x, out_len)
