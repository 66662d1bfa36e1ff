"""ConvLSTM encoder-forecaster (Shi et al. 2015), the classic nowcasting baseline.

Frames are folded by space-to-depth (``patch_size``) so the recurrent grid is
H/p x W/p. An encoder stack of ConvLSTM cells reads the inputs; a forecaster
stack starts from the encoder's states and unrolls ``out_len`` steps with no
external input (as in the paper); a 1x1 conv over all forecaster hidden states
gives each predicted frame, unfolded back by depth-to-space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Forecaster, check_input
from models.config import ModelConfig
from models.motion import Evolution, FlowHead, build_prior
from models.registry import register

State = tuple[Tensor, Tensor]


class ConvLSTMCell(nn.Module):
    """One ConvLSTM cell with peephole connections.

    i = sig(W_xi * x + W_hi * h + w_ci . c + b_i); f likewise with w_cf;
    c' = f . c + i . tanh(W_xc * x + W_hc * h + b_c);
    o = sig(W_xo * x + W_ho * h + w_co . c' + b_o); h' = o . tanh(c').
    ``*`` is a same-padded convolution, ``.`` the Hadamard product. Peephole
    weights are per channel (broadcast over space) so any grid size works.
    ``in_channels`` may be 0 (a cell with no input: state-to-state only).
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.hidden = hidden
        # input-to-state and state-to-state convs in one: conv over [x; h] -> 4 gate pre-activations
        self.conv = nn.Conv2d(in_channels + hidden, 4 * hidden, kernel_size, padding=kernel_size // 2)
        self.peep_i = nn.Parameter(torch.zeros(1, hidden, 1, 1))
        self.peep_f = nn.Parameter(torch.zeros(1, hidden, 1, 1))
        self.peep_o = nn.Parameter(torch.zeros(1, hidden, 1, 1))
        with torch.no_grad():  # forget-gate bias 1: remember by default early in training
            self.conv.bias[hidden : 2 * hidden].fill_(1.0)

    def forward(self, x: Tensor | None, state: State) -> State:
        """x: (B, C_in, h, w) or None; state (h, c), each (B, hidden, h, w). Returns the new (h, c)."""
        h, c = state
        z = self.conv(h if x is None else torch.cat([x, h], dim=1))
        zi, zf, zg, zo = z.chunk(4, dim=1)
        i = torch.sigmoid(zi + self.peep_i * c)
        f = torch.sigmoid(zf + self.peep_f * c)
        c = f * c + i * torch.tanh(zg)
        o = torch.sigmoid(zo + self.peep_o * c)
        return o * torch.tanh(c), c


@register("convlstm")
class ConvLSTM(Forecaster):
    """Encoder-forecaster ConvLSTM. Uses ``model.patch_size``, ``model.in_channels``, ``model.convlstm.*``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, hidden, k = cfg.patch_size, cfg.convlstm.hidden, cfg.convlstm.kernel_size
        folded = cfg.in_channels * p * p
        self.encoder = nn.ModuleList(
            ConvLSTMCell(folded if i == 0 else hidden[i - 1], hidden[i], k) for i in range(len(hidden))
        )
        # the forecaster's bottom cell has no input; upper cells read the cell below
        self.forecaster = nn.ModuleList(
            ConvLSTMCell(0 if i == 0 else hidden[i - 1], hidden[i], k) for i in range(len(hidden))
        )
        # model.motion: the flow head (below) draws the forecast instead; no pixel head
        self.head = None if cfg.motion else nn.Conv2d(sum(hidden), folded, kernel_size=1)
        if (
            self.head is not None and cfg.residual
        ):  # model.residual: the head outputs a change to the last input frame, 0 at the start
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        # model.motion: a flow per forecast step from the stacked hidden states (zero at the start)
        self.flow_head = FlowHead(sum(hidden), p, channels_last=False) if cfg.motion else None
        self.motion_prior = build_prior(cfg)  # model.prior: the flow the network's is added to

    def forward(self, x: Tensor, out_len: int, memory_x: Tensor | None = None, phase: int = 2) -> Tensor:
        """(B, T_in, C, H, W) on 0-1 -> (B, out_len, C, H, W); H, W multiples of patch_size."""
        check_input(x, self.cfg, out_len)
        B, T, C, H, W = x.shape
        p = self.cfg.patch_size
        frames = F.pixel_unshuffle(x.reshape(B * T, C, H, W), p).view(B, T, C * p * p, H // p, W // p)

        states = [
            (x.new_zeros(B, n, H // p, W // p), x.new_zeros(B, n, H // p, W // p)) for n in self.cfg.convlstm.hidden
        ]
        for t in range(T):
            inp: Tensor | None = frames[:, t]  # (B, C p^2, H/p, W/p)
            for i, cell in enumerate(self.encoder):
                states[i] = cell(inp, states[i])
                inp = states[i][0]

        preds = []
        evolution = None
        if self.flow_head is not None:
            evolution = Evolution(
                x[:, -1], self.motion_prior(x) if self.motion_prior is not None else None, self.cfg.inflow
            )
        for _ in range(out_len):
            inp = None
            for i, cell in enumerate(self.forecaster):
                states[i] = cell(inp, states[i])
                inp = states[i][0]
            hidden = torch.cat([h for h, _ in states], dim=1)  # (B, sum(hidden), H/p, W/p)
            if evolution is not None:  # model.motion: the last input advected by the accumulated flow + change
                preds.append(evolution.step(self.flow_head(hidden)))
            else:
                preds.append(F.pixel_shuffle(self.head(hidden), p))  # (B, C, H, W)
        out = torch.stack(preds, dim=1)  # (B, out_len, C, H, W)
        if self.flow_head is not None:
            return out
        return x[:, -1:] + out if self.cfg.residual else out  # model.residual: last input frame + change
