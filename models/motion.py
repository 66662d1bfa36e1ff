"""Motion-aware output (``model.motion``): the forecast is the previous frame carried by a predicted flow.

As the evolution network of NowcastNet (Zhang et al., Nature 2023) does, each forecast step predicts a
displacement field ``v`` (pixels per frame) and an intensity change ``s``; the next frame is the
previous one advected by ``v`` with a differentiable semi-Lagrangian (backward) warp, plus ``s``::

    x_{t+1}(p) = x_t(p - v_t(p)) + s_t(p)        x_T = the last input frame

The flow and the change are predicted on the token grid and upsampled bilinearly, so both are smooth
on the scale of a patch: the detail of the forecast comes from the advected frame, not from a
pixel-shuffled token (whose blocks of patch x patch pixels cost SSIM). The layer starts at zero, so a fresh model forecasts persistence, as ``model.residual`` does,
but the gradient of the warp reaches the flow from the first step: the network learns the motion
that optical flow extrapolates instead of having to draw each moved pixel anew. Rain that would be
advected in from outside the frame is unknown and enters as 0 (as in pysteps' extrapolation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def advect(frame: Tensor, flow: Tensor) -> Tensor:
    """Backward warp: out(p) = frame(p - flow(p)), bilinear, zeros outside the frame.

    ``frame`` (B, C, H, W); ``flow`` (B, 2, H, W) in pixels, channel 0 = dy (rows), 1 = dx (columns).
    """
    B, _, H, W = frame.shape
    ys = torch.arange(H, device=frame.device, dtype=flow.dtype)
    xs = torch.arange(W, device=frame.device, dtype=flow.dtype)
    src_y = ys.view(1, H, 1) - flow[:, 0]  # (B, H, W), source row of each pixel
    src_x = xs.view(1, 1, W) - flow[:, 1]
    # grid_sample's normalised coordinates (align_corners=False): pixel centre i -> (2 i + 1) / n - 1
    grid = torch.stack([(2 * src_x + 1) / W - 1, (2 * src_y + 1) / H - 1], dim=-1)  # (B, H, W, 2) as (x, y)
    return F.grid_sample(frame, grid.to(frame.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


class FlowHead(nn.Module):
    """Token features -> a smooth flow field and intensity change at pixel resolution, zero at initialisation.

    ``channels_last``: input (B, h, w, D) (the Swin models' tokens) or (B, D, h, w) (ConvLSTM's maps).
    Output (B, 3, h * scale, w * scale): flow (dy, dx) in pixels per frame, then the change on the 0-1 scale.
    """

    def __init__(self, dim: int, scale: int, channels_last: bool) -> None:
        super().__init__()
        self.scale, self.channels_last = scale, channels_last
        self.norm = nn.LayerNorm(dim) if channels_last else nn.GroupNorm(1, dim)
        self.proj = nn.Linear(dim, 3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero flow and change at the start: the first forecasts are persistence (a warp by 0 is the identity)."""
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            flow = self.proj(self.norm(x)).permute(0, 3, 1, 2)  # (B, 3, h, w)
        else:
            flow = self.proj(self.norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.scale == 1:
            return flow
        # the flow is in pixels, so its values are unchanged by the upsampling; only the grid is finer
        return F.interpolate(flow, scale_factor=self.scale, mode="bilinear", align_corners=False)


class Evolution:
    """The forecast frames of ``model.motion``: the last input frame carried by the accumulated flow, plus the
    accumulated change, resampled ONCE per lead.

    Step k predicts a flow v_k and a change s_k (a :class:`FlowHead` output). Displacements compose
    semi-Lagrangianly, D_k(p) = v_k(p) + D_{k-1}(p - v_k(p)), and so does the change, S_k(p) =
    S_{k-1}(p - v_k(p)) + s_k(p); the forecast is x_k(p) = x_T(p - D_k(p)) + S_k(p). Only the smooth
    fields D and S are resampled step after step; the frame itself is interpolated once per lead, so
    its texture is not blurred by twelve chained bilinear warps (which cost SSIM).
    """

    def __init__(self, origin: Tensor) -> None:
        self.origin = origin  # (B, C, H, W), the last input frame
        self.disp: Tensor | None = None  # (B, 2, H, W)
        self.change: Tensor | None = None  # (B, C, H, W)

    def step(self, motion: Tensor) -> Tensor:
        """``motion`` (B, 3, H, W): flow (dy, dx) and change of this step -> the forecast frame (B, C, H, W)."""
        flow, change = motion[:, :2], motion[:, 2:3]
        if self.disp is None:
            self.disp, self.change = flow, change
        else:
            carried = advect(torch.cat([self.disp, self.change], dim=1), flow)
            self.disp, self.change = flow + carried[:, :2], change + carried[:, 2:]
        return advect(self.origin, self.disp) + self.change
