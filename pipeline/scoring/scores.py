"""Nowcasting scores as streamed, vectorised torch accumulators.

:class:`ScoreAccumulator` takes batches of forecasts and truths shaped ``(B, T, 1, H, W)`` and keeps
only running sums on the tensors' device (contingency counts per threshold and lead time, squared and
absolute errors, SSIM sums, FSS sums), so predictions are never all held in memory and no batch forces
a host sync. :meth:`ScoreAccumulator.compute` turns the sums into scores once, at the end.

Conventions (the README's "Evaluation" section states them for users):

- **Scale and exactness.** Both fields are brought to float32 on the 0-255 VIL scale before any
  threshold: a uint8 field as is (``k`` -> ``k.0``), a float field on the 0-1 scale as ``x * 255``
  (a model's output, any range). A float truth is turned back into its integer exactly,
  ``round(x * 255)``. An event is ``value >= T``. ``(k / 255) * 255 == k`` holds exactly in float32
  and float64 for every ``k`` in 0..255, so a pixel equal to the threshold counts the same whether a
  forecaster hands over uint8 (persistence) or floats on the 0-1 scale.
- **Categorical scores.** Per threshold T and lead time: hits H (forecast >= T and truth >= T),
  misses M, false alarms F, correct negatives R. CSI = H/(H+M+F), POD = H/(H+M), SUCR = H/(H+F)
  = 1 - FAR, FAR = F/(H+F), BIAS = (H+F)/(H+M), HSS = 2(HR - FM)/((H+M)(M+R) + (H+F)(F+R)).
  The aggregate score of a threshold sums H, M, F, R over every pixel and every lead time (the
  Earthformer convention); a per-lead score sums over that lead's pixels only. CSI-M and HSS-M are
  means over thresholds.
- **Pooled CSI.** Forecast and truth are max-pooled with kernel = stride = k on the 0-255 scale
  (edge blocks that do not fill k x k are kept), then thresholded as above.
- **Continuous scores.** MSE and MAE on the 0-1 scale (the forecast as given, not clipped), averaged
  over pixels; SSIM with an 11 x 11 Gaussian window, sigma 1.5, data range 1 (``pytorch_msssim``),
  averaged over frames.
- **FSS** (optional, ``fss_scales``): fractions of events in a k x k neighbourhood (zero padding,
  the window placed as :func:`scipy.ndimage.uniform_filter` places it, as in pysteps), then
  FSS = 1 - sum (Pf - Po)^2 / sum (Pf^2 + Po^2), summed over pixels (and lead times for the aggregate).
- **Undefined scores.** A score whose denominator is 0 (e.g. a threshold that neither forecast nor
  truth reaches, 0/0) is undefined: ``None`` in the result (``null`` in JSON; NaN is not valid JSON),
  and left out of every mean. A mean with no defined member is ``None`` too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.config import EvaluateConfig

DEFAULT_THRESHOLDS = (16, 74, 133, 160, 181, 219)
CATEGORICAL = ("csi", "pod", "sucr", "far", "bias", "hss")
SSIM_WIN_SIZE = 11
SSIM_WIN_SIGMA = 1.5


def categorical_scores(hits: Any, misses: Any, false_alarms: Any, correct_negatives: Any) -> dict[str, torch.Tensor]:
    """CSI, POD, SUCR, FAR, BIAS, HSS from contingency counts (any broadcastable shapes).

    Returns float64 tensors; an undefined score (zero denominator) is NaN here and becomes ``None``
    in :meth:`ScoreAccumulator.compute`.
    """
    h, m, f, r = (torch.as_tensor(v, dtype=torch.float64) for v in (hits, misses, false_alarms, correct_negatives))

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), torch.nan)

    return {
        "csi": ratio(h, h + m + f),
        "pod": ratio(h, h + m),
        "sucr": ratio(h, h + f),
        "far": ratio(f, h + f),
        "bias": ratio(h + f, h + m),
        "hss": ratio(2 * (h * r - f * m), (h + m) * (m + r) + (h + f) * (f + r)),
    }


def to_vil255(x: torch.Tensor, *, exact_integers: bool = False) -> torch.Tensor:
    """A field as float32 on the 0-255 scale: uint8 as is, floating point (0-1 scale) times 255.

    ``exact_integers`` rounds a float field to the nearest integer (for stored truths given as
    ``uint8 / 255``, which this recovers exactly).
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32)
    if not x.is_floating_point():
        raise TypeError(f"expected a uint8 (0-255) or floating point (0-1) tensor, got {x.dtype}")
    y = x.to(torch.float32) * 255.0
    return y.round_() if exact_integers else y


def to_unit_scale(x: torch.Tensor) -> torch.Tensor:
    """A field as float32 on the 0-1 scale: uint8 / 255, floating point as given."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def _fractions(events: torch.Tensor, scale: int) -> torch.Tensor:
    """Share of event pixels in each ``scale`` x ``scale`` neighbourhood, zero padded, via an integral image.

    ``events`` (N, 1, H, W) float 0/1. The window covers ``[i - scale // 2, i + (scale - 1) // 2]``,
    where scipy's ``uniform_filter`` (pysteps' FSS) puts it for odd and even sizes alike. The cost
    does not grow with ``scale``; the running sums are integers, exact in float32 below 2^24 pixels.
    """
    if scale == 1:
        return events
    lo, hi = scale // 2, (scale - 1) // 2
    integral = F.pad(events, (lo + 1, hi, lo + 1, hi)).cumsum(-1).cumsum(-2)  # (N, 1, H + k, W + k)
    k = scale
    box = integral[..., k:, k:] - integral[..., :-k, k:] - integral[..., k:, :-k] + integral[..., :-k, :-k]
    return box / float(k * k)


def _block_max(classes: torch.Tensor, k: int) -> torch.Tensor:
    """Max over k x k blocks (kernel = stride = k) of ``(B, T, H, W)`` maps; partial edge blocks are kept.

    The edge is padded with 0, which never raises a block's maximum (classes and VIL are >= 0).
    """
    b, t, h, w = classes.shape
    ph, pw = -h % k, -w % k
    if ph or pw:
        classes = F.pad(classes, (0, pw, 0, ph))
    return classes.view(b, t, (h + ph) // k, k, (w + pw) // k, k).amax(dim=(3, 5))


class ScoreAccumulator:
    """Streams forecasts and truths, keeps running sums, computes every score at the end.

    Args:
        thresholds: event thresholds on the 0-255 VIL scale (default the SEVIR six; kept sorted, unique).
        pool_sizes: pooled-CSI kernel sizes (kernel = stride); a size of 1 is the plain CSI and is skipped.
        out_len: lead times per forecast (T of the tensors passed to :meth:`update`).
        ssim: also accumulate SSIM (11 x 11 Gaussian, sigma 1.5).
        fss_scales: neighbourhood sizes in pixels for the FSS (empty: no FSS).
        device: where the running sums live; inputs are moved there (non-blocking).

    ``update(pred, target)`` with tensors ``(B, T, 1, H, W)``: ``pred`` float on the 0-1 scale (any
    range; compared as ``pred * 255 >= T``) or uint8 0-255; ``target`` uint8 0-255 or float 0-1
    (turned back into integers exactly). ``compute()`` returns the metrics block of
    ``reports/metrics.json`` (see the module docstring for the conventions)::

        {"csi_m", "hss_m", "csi_pool4_m", "csi_pool16_m", "mse", "mae", "ssim",
         "csi": {"16": ...}, "pod", "sucr", "far", "bias", "hss", "csi_pool4", "csi_pool16",
         "per_lead": {"csi": {"16": [T values]}, "csi_m": [...], "mse": [...], ...}}

    Undefined scores are ``None``. Under ``torch.distributed``, call :meth:`all_reduce` on every rank
    before :meth:`compute` to sum the ranks' shares.
    """

    def __init__(self, thresholds: Sequence[int] = DEFAULT_THRESHOLDS, pool_sizes: Sequence[int] = (4, 16),
                 out_len: int = 12, ssim: bool = True, fss_scales: Sequence[int] = (),
                 device: torch.device | str = "cpu"):  # fmt: skip
        if not thresholds:
            raise ValueError("ScoreAccumulator needs at least one threshold")
        if any(not 0 <= int(t) <= 255 for t in thresholds):
            raise ValueError(f"thresholds must lie on the 0-255 VIL scale, got {list(thresholds)}")
        if any(int(k) < 1 for k in [*pool_sizes, *fss_scales]):
            raise ValueError("pool sizes and FSS scales must be >= 1 pixel")
        if out_len < 1:
            raise ValueError(f"out_len must be >= 1, got {out_len}")
        self.thresholds = tuple(sorted({int(t) for t in thresholds}))
        self.pool_sizes = tuple(dict.fromkeys(int(k) for k in pool_sizes if int(k) > 1))
        self.fss_scales = tuple(dict.fromkeys(int(k) for k in fss_scales))
        self.out_len = int(out_len)
        self.with_ssim = bool(ssim)
        self.device = torch.device(device)
        n = len(self.thresholds) + 1
        self._lead_offset = torch.arange(self.out_len, device=self.device, dtype=torch.int32) * n * n
        self._one = torch.ones(1, dtype=torch.int64, device=self.device)
        self.reset()

    @classmethod
    def from_config(
        cls, evaluate: EvaluateConfig, out_len: int, device: torch.device | str = "cpu"
    ) -> ScoreAccumulator:
        """An accumulator with the thresholds, pool sizes, SSIM and FSS choices of ``cfg.evaluate``."""
        return cls(thresholds=evaluate.thresholds, pool_sizes=evaluate.pool_sizes, out_len=out_len,
                   ssim=evaluate.ssim, fss_scales=evaluate.fss_scales, device=device)  # fmt: skip

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything accumulated so far."""
        n_thr, t, dev = len(self.thresholds), self.out_len, self.device
        counts = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=dev)  # noqa: E731
        sums = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
        # contingency counts, (pool, threshold, lead); pool 0 is the plain field
        n_pool = 1 + len(self.pool_sizes)
        self._hits = counts(n_pool, n_thr, t)
        self._fcst_events = counts(n_pool, n_thr, t)  # H + F
        self._obs_events = counts(n_pool, n_thr, t)  # H + M
        self._cells = counts(n_pool, t)  # H + M + F + R per lead (same for every threshold)
        self._sq_err = sums(t)
        self._abs_err = sums(t)
        self._pixels = counts(t)
        self._ssim = sums(t)
        self._frames = counts(t)
        # FSS sums, (scale, threshold, lead)
        self._fss_num = sums(len(self.fss_scales), n_thr, t)
        self._fss_den = sums(len(self.fss_scales), n_thr, t)
        self.windows = 0  # forecasts scored (host-side count from shapes: no sync)

    def _state(self) -> list[torch.Tensor]:
        return [self._hits, self._fcst_events, self._obs_events, self._cells, self._sq_err, self._abs_err,
                self._pixels, self._ssim, self._frames, self._fss_num, self._fss_den]  # fmt: skip

    def all_reduce(self) -> None:
        """Sum the running sums over the ranks of an initialised ``torch.distributed`` group (no-op otherwise)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for tensor in self._state():
            dist.all_reduce(tensor)
        windows = torch.tensor([self.windows], dtype=torch.int64, device=self.device)
        dist.all_reduce(windows)
        self.windows = int(windows.item())

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` shaped ``(B, T, 1, H, W)`` (see the class docstring)."""
        if pred.shape != target.shape:
            raise ValueError(f"forecast shape {tuple(pred.shape)} differs from truth shape {tuple(target.shape)}")
        if pred.dim() != 5 or pred.shape[1] != self.out_len or pred.shape[2] != 1:
            raise ValueError(f"expected (B, {self.out_len}, 1, H, W) tensors, got {tuple(pred.shape)}")
        b, t, _, h, w = pred.shape
        pred = pred.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)

        # threshold classes: the number of thresholds each pixel reaches, (B, T, H, W) uint8
        p_cls = self._classes(pred.reshape(b, t, h, w))
        o_cls = self._classes(target.reshape(b, t, h, w), truth=True)
        self._count(0, p_cls, o_cls)
        for i, k in enumerate(self.pool_sizes, start=1):
            # max-pooling commutes with the (monotone) class map: pool the classes, as uint8
            self._count(i, _block_max(p_cls, k), _block_max(o_cls, k))

        p01 = to_unit_scale(pred).reshape(b, t, h * w)
        o01 = to_vil255(target, exact_integers=True).reshape(b, t, h * w) / 255.0
        diff = p01 - o01
        self._sq_err += diff.square().sum(dim=(0, 2))
        self._abs_err += diff.abs().sum(dim=(0, 2))
        self._pixels += b * h * w
        if self.with_ssim:
            from pytorch_msssim import ssim

            # leads as the batch axis and windows as channels: the same per-frame SSIM (channels are
            # filtered apart) and the result is each lead's mean; on CPU channels-last makes the grouped
            # Gaussian convolutions ~15x faster than the (B*T, 1, H, W) layout
            p_lead, o_lead = p01.view(b, t, h, w).transpose(0, 1), o01.view(b, t, h, w).transpose(0, 1)
            if p_lead.device.type == "cpu":
                p_lead = p_lead.contiguous(memory_format=torch.channels_last)
                o_lead = o_lead.contiguous(memory_format=torch.channels_last)
            lead_ssim = ssim(p_lead, o_lead, data_range=1.0, size_average=False, win_size=SSIM_WIN_SIZE,
                             win_sigma=SSIM_WIN_SIGMA)  # fmt: skip
            self._ssim += lead_ssim.to(torch.float64) * b
            self._frames += b
        if self.fss_scales:
            self._accumulate_fss(p_cls, o_cls)
        self.windows += b

    def _classes(self, x: torch.Tensor, truth: bool = False) -> torch.Tensor:
        """How many thresholds each pixel reaches, as uint8: uint8 compared as integers, floats as ``x * 255``.

        A NaN reaches no threshold. A float truth is first turned back into its integer exactly.
        """
        if x.dtype != torch.uint8:
            x = to_vil255(x, exact_integers=truth)
        classes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
        for threshold in self.thresholds:
            classes += x >= threshold
        return classes

    def _count(self, pool: int, p_cls: torch.Tensor, o_cls: torch.Tensor) -> None:
        """Add the contingency counts of one (pooled) class-map pair ``(B, T, h, w)``, per threshold and lead.

        One joint histogram of (lead, forecast class, truth class) holds every threshold's table: a
        pixel is an event for threshold j exactly when its class exceeds j (thresholds are sorted).
        """
        n = len(self.thresholds) + 1
        b, t, h, w = p_cls.shape
        # int32 keeps the index arithmetic 4x cheaper than int64 on CPU; values stay below t * n^2
        joint = (p_cls.to(torch.int32) * n + o_cls + self._lead_offset[:t].view(1, t, 1, 1)).flatten()
        size = t * n * n
        if joint.is_cuda:  # bincount syncs with the host on CUDA (it reads the max); index_add_ does not
            hist = torch.zeros(size, dtype=torch.int64, device=joint.device)
            hist.index_add_(0, joint, self._one.expand(joint.numel()))
        else:
            hist = torch.bincount(joint, minlength=size)
        # tail[t, a, c] = pixels with forecast class >= a and truth class >= c
        tail = hist.view(t, n, n).flip(1, 2).cumsum(1).cumsum(2).flip(1, 2)
        j = torch.arange(1, n, device=tail.device)
        self._hits[pool] += tail[:, j, j].T  # (K, T)
        self._fcst_events[pool] += tail[:, j, 0].T
        self._obs_events[pool] += tail[:, 0, j].T
        self._cells[pool] += b * h * w

    def _accumulate_fss(self, p_cls: torch.Tensor, o_cls: torch.Tensor) -> None:
        b, t, h, w = p_cls.shape
        n_thr = len(self.thresholds)
        levels = torch.arange(n_thr, device=p_cls.device, dtype=torch.uint8).view(-1, 1, 1, 1, 1)
        # (n_thr, B, T, H, W) event fields -> (n_thr * B * T, 1, H, W) float
        p_ev = (p_cls.unsqueeze(0) > levels).to(torch.float32).view(-1, 1, h, w)
        o_ev = (o_cls.unsqueeze(0) > levels).to(torch.float32).view(-1, 1, h, w)
        for i, k in enumerate(self.fss_scales):
            pf, po = _fractions(p_ev, k), _fractions(o_ev, k)
            shape = (n_thr, b, t, -1)
            num = (pf - po).square().view(shape).sum(dim=(1, 3))
            den = (pf.square() + po.square()).view(shape).sum(dim=(1, 3))
            self._fss_num[i] += num
            self._fss_den[i] += den

    # ---------------------------------------------------------------- compute
    def compute(self) -> dict[str, Any]:
        """Every score, JSON-ready: floats, ``None`` for undefined, threshold keys as strings."""
        state = [s.detach().to("cpu", torch.float64) for s in self._state()]  # one transfer, one sync
        hits, fcst, obs, cells, sq_err, abs_err, pixels, ssim_sum, frames, fss_num, fss_den = state
        keys = [str(t) for t in self.thresholds]
        misses, false_alarms = obs - hits, fcst - hits
        negatives = cells.unsqueeze(1) - hits - misses - false_alarms  # (pool, thr, lead)

        agg = categorical_scores(hits.sum(-1), misses.sum(-1), false_alarms.sum(-1), negatives.sum(-1))
        lead = categorical_scores(hits, misses, false_alarms, negatives)

        out: dict[str, Any] = {
            "csi_m": _mean(agg["csi"][0]),
            "hss_m": _mean(agg["hss"][0]),
        }
        for i, k in enumerate(self.pool_sizes, start=1):
            out[f"csi_pool{k}_m"] = _mean(agg["csi"][i])
        out["mse"] = _ratio(sq_err.sum(), pixels.sum())
        out["mae"] = _ratio(abs_err.sum(), pixels.sum())
        if self.with_ssim:
            out["ssim"] = _ratio(ssim_sum.sum(), frames.sum())
        for name in CATEGORICAL:
            out[name] = dict(zip(keys, _floats(agg[name][0]), strict=True))
        for i, k in enumerate(self.pool_sizes, start=1):
            out[f"csi_pool{k}"] = dict(zip(keys, _floats(agg["csi"][i]), strict=True))
        fss_agg = 1 - fss_num.sum(-1) / torch.where(fss_den.sum(-1) != 0, fss_den.sum(-1), torch.nan)
        fss_lead = 1 - fss_num / torch.where(fss_den != 0, fss_den, torch.nan)
        for i, k in enumerate(self.fss_scales):
            out[f"fss{k}_m"] = _mean(fss_agg[i])
            out[f"fss{k}"] = dict(zip(keys, _floats(fss_agg[i]), strict=True))

        per_lead: dict[str, Any] = {}
        for name in CATEGORICAL:
            per_lead[name] = {key: _floats(lead[name][0, j]) for j, key in enumerate(keys)}
        per_lead["csi_m"] = [_mean(lead["csi"][0, :, j]) for j in range(self.out_len)]
        per_lead["hss_m"] = [_mean(lead["hss"][0, :, j]) for j in range(self.out_len)]
        for i, k in enumerate(self.pool_sizes, start=1):
            per_lead[f"csi_pool{k}_m"] = [_mean(lead["csi"][i, :, j]) for j in range(self.out_len)]
        per_lead["mse"] = [_ratio(sq_err[j], pixels[j]) for j in range(self.out_len)]
        per_lead["mae"] = [_ratio(abs_err[j], pixels[j]) for j in range(self.out_len)]
        if self.with_ssim:
            per_lead["ssim"] = [_ratio(ssim_sum[j], frames[j]) for j in range(self.out_len)]
        for i, k in enumerate(self.fss_scales):
            per_lead[f"fss{k}_m"] = [_mean(fss_lead[i, :, j]) for j in range(self.out_len)]
        out["per_lead"] = per_lead
        return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _floats(values: torch.Tensor) -> list[float | None]:
    return [_finite(float(v)) for v in values.tolist()]


def _mean(values: torch.Tensor) -> float | None:
    """Mean of the defined (finite) values; ``None`` when there are none."""
    defined = values[torch.isfinite(values)]
    return float(defined.mean()) if defined.numel() else None


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float | None:
    """``num / den``; ``None`` when undefined (no pixels) or not finite (a forecast holding NaN or inf)."""
    return _finite(float(num / den)) if float(den) != 0 else None
