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
advected in from outside the frame is unknown: ``model.inflow: zero`` lets it enter as 0 (as pysteps'
extrapolation does), ``edge`` takes the nearest edge pixel's value (the frame's border held as persistence),
for the frame and for the carried displacement and change fields alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INFLOW_PADDING = {"zero": "zeros", "edge": "border"}  # model.inflow -> grid_sample's padding_mode


def advect(frame: Tensor, flow: Tensor, inflow: str = "zero") -> Tensor:
    """Backward warp: out(p) = frame(p - flow(p)), bilinear; outside the frame: 0 (``inflow="zero"``) or the
    nearest edge pixel (``"edge"``).

    ``frame`` (B, C, H, W); ``flow`` (B, 2, H, W) in pixels, channel 0 = dy (rows), 1 = dx (columns).
    """
    B, _, H, W = frame.shape
    ys = torch.arange(H, device=frame.device, dtype=flow.dtype)
    xs = torch.arange(W, device=frame.device, dtype=flow.dtype)
    src_y = ys.view(1, H, 1) - flow[:, 0]  # (B, H, W), source row of each pixel
    src_x = xs.view(1, 1, W) - flow[:, 1]
    # grid_sample's normalised coordinates (align_corners=False): pixel centre i -> (2 i + 1) / n - 1
    grid = torch.stack([(2 * src_x + 1) / W - 1, (2 * src_y + 1) / H - 1], dim=-1)  # (B, H, W, 2) as (x, y)
    padding = INFLOW_PADDING[inflow]
    return F.grid_sample(frame, grid.to(frame.dtype), mode="bilinear", padding_mode=padding, align_corners=False)


class FlowHead(nn.Module):
    """Token features -> a smooth flow field and intensity change at pixel resolution, zero at initialisation.

    ``channels_last``: input (B, h, w, D) (the Swin models' tokens) or (B, D, h, w) (ConvLSTM's maps).
    Output (B, 3, h * scale, w * scale): flow (dy, dx) in pixels per frame, then the change on the 0-1 scale.
    """

    # Output units per unit of the layer's pre-activation. Adam moves every weight by about lr per step
    # whatever its gradient, so these set how far one step can move the forecast: a flow in pixels and
    # a change on the 0-1 scale (one step at lr 1e-3 moves the change by ~1e-3 x dim x CHANGE_SCALE)
    FLOW_SCALE = 1.0
    CHANGE_SCALE = 0.05

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
        gain = flow.new_tensor([self.FLOW_SCALE, self.FLOW_SCALE, self.CHANGE_SCALE]).view(1, 3, 1, 1)
        flow = flow * gain
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

    def __init__(self, origin: Tensor, prior: Tensor | None = None, inflow: str = "zero") -> None:
        self.origin = origin  # (B, C, H, W), the last input frame
        self.prior = prior  # (B, 2, H, W) or None: a flow added to every step's (model.prior)
        self.inflow = inflow  # model.inflow: what enters from outside the frame (see advect)
        self.disp: Tensor | None = None  # (B, 2, H, W)
        self.change: Tensor | None = None  # (B, C, H, W)

    def step(self, motion: Tensor) -> Tensor:
        """``motion`` (B, 3, H, W): flow (dy, dx) and change of this step -> the forecast frame (B, C, H, W)."""
        flow, change = motion[:, :2], motion[:, 2:3]
        if self.prior is not None:
            flow = flow + self.prior
        if self.disp is None:
            self.disp, self.change = flow, change
        else:
            carried = advect(torch.cat([self.disp, self.change], dim=1), flow, self.inflow)
            self.disp, self.change = flow + carried[:, :2], change + carried[:, 2:]
        return advect(self.origin, self.disp, self.inflow) + self.change


class MotionPrior(nn.Module):
    """A flow estimate from the input frames alone (``model.prior``): the forecast starts from motion.

    Block matching, as a classical extrapolation nowcast does, but differentiable and batched: the
    frames are average-pooled by ``pool``; each coarse pixel is described by its zero-mean, unit-norm
    ``patch x patch`` neighbourhood (about 18 pixels across: 3 x 3 at pool 4 was too weak a descriptor and
    underestimated shifts by half; pool 2 with 9 x 9 beats pool 4 with 5 x 5 by 0.015 val CSI-M, see
    benchmarks/README.md); the descriptors of frame ``t - lag`` are compared (cosine) with those of
    frame ``t`` displaced by every ``(dy, dx)`` within ``+-radius`` coarse pixels, for the last
    ``pairs`` such pairs of inputs; a softmax over the displacements (learned sharpness) gives a
    soft-argmax displacement and a confidence per coarse pixel. Flows are averaged over the pairs,
    weighted by confidence x rain (texture-free, rain-free places carry no motion information), smoothed
    by a normalised box filter of ``smooth`` coarse pixels and filled with the sample's weighted mean
    flow where nothing is near, then brought to pixels per frame and upsampled bilinearly.

    The fastest motion it can see is ``radius * pool / lag`` pixels per frame (default 6 x 2 / 2 = 6).
    Its only parameter is the sharpness; the network's own flow (:class:`FlowHead`) is added to it.
    """

    def __init__(
        self,
        pool: int = 2,
        radius: int = 6,
        lag: int = 2,
        pairs: int = 3,
        smooth: int = 15,
        patch: int = 9,
        sharpness: float = 50.0,
    ) -> None:
        super().__init__()
        self.pool, self.radius, self.lag, self.pairs, self.smooth = pool, radius, lag, pairs, smooth
        side = 2 * radius + 1
        dy, dx = torch.meshgrid(torch.arange(side) - radius, torch.arange(side) - radius, indexing="ij")
        self.register_buffer("displacements", torch.stack([dy, dx]).flatten(1).float(), persistent=False)  # (2, K)
        self.patch = patch
        self.log_temperature = nn.Parameter(torch.tensor(math.log(sharpness)))

    def box(self, frames: Tensor) -> Tensor:
        """The mean over each pixel's ``patch x patch`` neighbourhood, zeros outside the map included.

        Separable running sums (cumsum, then the difference ``patch`` apart), so it costs a few operations
        per pixel whatever the patch; ~4x faster on CPU than a stride-1 ``avg_pool2d``.
        """
        k = self.patch
        lo, hi = k // 2 + 1, k // 2  # one extra zero in front: the running sum's difference needs it
        total = F.pad(frames, (lo, hi, lo, hi)).cumsum(-1)
        total = (total[..., k:] - total[..., :-k]).cumsum(-2)
        return (total[..., k:, :] - total[..., :-k, :]) / (k * k)

    def statistics(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 1, h, w) coarse frames -> the mean and 1 / norm of each pixel's zero-mean ``patch x patch``
        neighbourhood (zeros outside the map count as values, as in a zero-padded unfold)."""
        mean = self.box(frames)
        centred = (self.box(frames * frames) - mean * mean).clamp_min(0) * self.patch**2  # sum of squared deviations
        return mean, torch.rsqrt(centred + 1e-8)

    def correlation(self, src: Tensor, dst: Tensor) -> Tensor:
        """Cosine similarity of the zero-mean neighbourhoods of ``src`` at p and ``dst`` at p + d, for every
        displacement d within the radius: (N, 1, h, w) twice -> (N, K, h, w); 0 where p + d is off the map.

        Computed without materialising the ``patch^2``-long descriptors: the sum of products of two
        zero-mean neighbourhoods is box(src * dst_shifted) - patch^2 mean_src mean_dst, so each displacement
        costs one product and one separable box filter instead of ``patch^2`` products (same result).
        """
        r = self.radius
        h, w = src.shape[-2:]
        side = 2 * r + 1
        # float64: mean(x^2) - mean(x)^2 and the running sums cancel on flat neighbourhoods (a saturated
        # VIL core at 255): in float32 their rounding noise became "texture" and gave correlations of 1e3
        dtype, src, dst = src.dtype, src.double(), dst.double()
        mean_s, inv_s = self.statistics(src)
        mean_d, inv_d = self.statistics(dst)
        pad = (r, r, r, r)
        dst, mean_d, inv_d = F.pad(dst, pad), F.pad(mean_d, pad), F.pad(inv_d, pad)  # inv is 0 off the map
        rows = []
        for i in range(side):  # one row of displacements at a time: (N, side, h, w) products, box-filtered together
            cols = [slice(j, j + w) for j in range(side)]
            shifted = torch.cat([dst[:, :, i : i + h, c] for c in cols], dim=1)
            cross = self.box(src * shifted)
            mean = torch.cat([mean_d[:, :, i : i + h, c] for c in cols], dim=1)
            inv = torch.cat([inv_d[:, :, i : i + h, c] for c in cols], dim=1)
            rows.append((cross - mean_s * mean) * self.patch**2 * inv_s * inv)
        return torch.cat(rows, dim=1).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C, H, W) inputs on 0-1 -> flow (B, 2, H, W) in pixels per frame (dy, dx); 0 for T = 1."""
        B, T, _, H, W = x.shape
        lag = min(self.lag, T - 1)
        if lag < 1:
            return x.new_zeros(B, 2, H, W)
        pairs = min(self.pairs, T - lag)
        p = self.pool
        frames = x[:, T - lag - pairs :, :1].float()  # pairs (t - lag, t) for the last `pairs` t; channel 0 (VIL)
        n = frames.shape[1]
        coarse = F.avg_pool2d(frames.reshape(B * n, 1, H, W), p)  # (B n, 1, h, w)
        h, w = coarse.shape[-2:]
        rain = coarse.view(B, n, 1, h, w)
        src = rain[:, : n - lag].reshape(-1, 1, h, w)  # frame t - lag of each pair
        dst = rain[:, lag:].reshape(-1, 1, h, w)  # frame t
        with torch.no_grad():  # the frames carry no gradient: only the sharpness below is learned
            corr = self.correlation(src, dst)  # (B pairs, K, h, w)
        probs = torch.softmax(corr * self.log_temperature.exp(), dim=1)
        flow = torch.einsum("nkhw,ck->nchw", probs, self.displacements).view(B, pairs, 2, h, w)
        confidence = probs.amax(dim=1).view(B, pairs, 1, h, w)
        weight = confidence * rain[:, : n - lag]  # (B, pairs, 1, h, w), at the pairs' source pixels
        flow = (flow * weight).sum(dim=1)  # (B, 2, h, w), weighted sums over the pairs
        weight = weight.sum(dim=1)  # (B, 1, h, w)
        k = 2 * self.smooth + 1
        local_flow = F.avg_pool2d(flow, k, stride=1, padding=self.smooth, count_include_pad=False)
        local_weight = F.avg_pool2d(weight, k, stride=1, padding=self.smooth, count_include_pad=False)
        mean_flow = flow.sum(dim=(2, 3), keepdim=True) / (weight.sum(dim=(2, 3), keepdim=True) + 1e-6)
        # near rain: the local weighted mean; far from any: the sample's mean (a smooth blend between them)
        trust = local_weight / (local_weight + 0.02)
        flow = trust * local_flow / (local_weight + 1e-6) + (1 - trust) * mean_flow
        flow = flow * (p / lag)  # coarse pixels per `lag` frames -> pixels per frame
        return F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False).to(x.dtype)


def build_prior(cfg) -> MotionPrior | None:
    """The ``model.prior`` module of a ModelConfig, or None."""
    if not cfg.motion or cfg.prior.kind == "none":
        return None
    p = cfg.prior
    return MotionPrior(pool=p.pool, radius=p.radius, lag=p.lag, pairs=p.pairs, smooth=p.smooth, patch=p.patch)
