"""Training losses on the 0-1 VIL scale: L1 + lambda MSE, intensity-balanced (B-MAE/B-MSE), SSIM.

``ForecastLoss(phase_cfg)(pred, target)`` returns the scalar loss of a (B, T, C, H, W) forecast.

- ``l1_weight * L1 + l2_weight * MSE``: the DATSwinLSTM / LMC-Memory training loss.
- ``balanced``: B-MAE and B-MSE of Shi et al. (2017, TrajGRU): every pixel's error is weighted by
  the intensity class of its target, so the rare heavy-rain pixels are not blurred away. Class k
  holds target VIL (0-255) in [thresholds[k-1], thresholds[k]). The paper's five classes (rain rate
  edges 2 / 5 / 10 / 30 mm/h, weights 1 / 2 / 5 / 10 / 30) are carried over to VIL with the standard
  SEVIR thresholds 16 / 74 / 133 / 181 as edges (a choice: VIL is not a rain rate; set
  ``balance_thresholds`` / ``balance_weights`` to change it). The weighted errors are averaged over
  all pixels (not normalised by the weights), as in the paper, so the weights raise the loss.
- ``csi_weight * (1 - soft CSI)``: the score the evaluation reports, made differentiable: at each of
  ``csi_thresholds`` (VIL 0-255) a forecast pixel is an event with probability
  ``sigmoid((255 pred - T) / csi_softness)``, the target's events are exact; hits, misses and false
  alarms are summed over the batch (as the scores accumulate them) and CSI = hits / (hits + misses +
  false alarms) is averaged over the thresholds present in the batch. L1 and MSE reward a blurred
  forecast where the position is uncertain; this term rewards getting the rain areas right.
- ``ssim_weight * (1 - SSIM)``: Gaussian 11x11 window, sigma 1.5 (the SEVIR scoring SSIM),
  computed per frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # (size, size)


def ssim(pred: Tensor, target: Tensor, window: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM of (B, T, C, H, W) frames on a ``data_range`` scale (valid-region Gaussian filter)."""
    B, T, C, H, W = pred.shape
    x = pred.reshape(B * T * C, 1, H, W).float()
    y = target.reshape(B * T * C, 1, H, W).float()
    k = window.to(x.device, x.dtype)[None, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    sxx = F.conv2d(x * x, k) - mu_x**2
    syy = F.conv2d(y * y, k) - mu_y**2
    sxy = F.conv2d(x * y, k) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean()


class ForecastLoss(nn.Module):
    """The configured loss of one phase (see the module docstring). Returns (loss, parts) with parts
    a dict of detached scalar tensors (no host sync)."""

    def __init__(self, phase_cfg) -> None:
        super().__init__()
        self.l1, self.l2 = phase_cfg.l1_weight, phase_cfg.l2_weight
        self.ssim_weight = phase_cfg.ssim_weight
        self.csi_weight = phase_cfg.csi_weight
        self.csi_softness = phase_cfg.csi_softness / 255.0
        self.register_buffer("csi_thresholds", torch.tensor(phase_cfg.csi_thresholds, dtype=torch.float32) / 255.0,
                             persistent=False)  # fmt: skip
        self.balanced = phase_cfg.balanced
        self.register_buffer("edges", torch.tensor(phase_cfg.balance_thresholds, dtype=torch.float32) / 255.0,
                             persistent=False)  # fmt: skip
        self.register_buffer("class_weights", torch.tensor(phase_cfg.balance_weights, dtype=torch.float32),
                             persistent=False)  # fmt: skip
        self.register_buffer("window", gaussian_window(), persistent=False)

    def pixel_weights(self, target: Tensor) -> Tensor:
        """Per-pixel B-MSE/B-MAE weights of a 0-1 target: the weight of its intensity class."""
        # target values are k/255 exactly; a tiny tolerance keeps VIL == threshold in the upper class
        cls = torch.bucketize(target.float() + 1e-6, self.edges.to(target.device), right=True)
        return self.class_weights.to(target.device)[cls]

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        pred32, target32 = pred.float(), target.float()
        err = pred32 - target32
        if self.balanced:
            w = self.pixel_weights(target32)
            l1 = (w * err.abs()).mean()
            l2 = (w * err.square()).mean()
        else:
            l1 = err.abs().mean()
            l2 = err.square().mean()
        loss = self.l1 * l1 + self.l2 * l2
        parts = {"l1": l1.detach(), "mse": l2.detach()}
        if self.ssim_weight > 0:
            s = ssim(pred32, target32, self.window)
            loss = loss + self.ssim_weight * (1 - s)
            parts["ssim"] = s.detach()
        if self.csi_weight > 0:
            c = soft_csi(pred32, target32, self.csi_thresholds.to(pred32.device), self.csi_softness)
            loss = loss + self.csi_weight * (1 - c)
            parts["soft_csi"] = c.detach()
        return loss, parts


def soft_csi(pred: Tensor, target: Tensor, thresholds: Tensor, softness: float) -> Tensor:
    """Differentiable CSI of a 0-1 forecast, averaged over ``thresholds`` (0-1 scale) whose events occur in
    the target or the forecast (a threshold nobody reaches has no CSI, as in the scores); 1 if none does."""
    shape = (-1,) + (1,) * pred.ndim
    t = thresholds.view(shape)
    forecast = torch.sigmoid((pred.unsqueeze(0) - t) / softness)  # (K, B, T, C, H, W)
    observed = (target.unsqueeze(0) >= t - 1e-6).float()
    dims = tuple(range(1, forecast.ndim))
    hits = (forecast * observed).sum(dim=dims)
    false_alarms = (forecast * (1 - observed)).sum(dim=dims)
    union = observed.sum(dim=dims) + false_alarms  # hits + misses + false alarms
    # a threshold is scored where the target or the (rounded) forecast has an event, as the scores do
    present = (observed.amax(dim=dims) > 0) | ((forecast > 0.5).flatten(1).any(dim=1))
    csi = hits / union.clamp_min(1e-6)
    count = present.sum()
    mean = (csi * present).sum() / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.ones_like(mean))
