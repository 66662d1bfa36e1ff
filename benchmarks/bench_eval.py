"""Evaluation throughput: windows/s per forecaster, split into forecasting and scoring time.

    python benchmarks/bench_eval.py [--windows 24] [--batch 4] [--size 128] [--device auto] [--params params.yaml]

Builds the default model of ``--params`` (random weights: the cost does not depend on them) and
the baselines, makes ``--windows`` synthetic VIL windows (moving storm cells, ``in_len`` +
``out_len`` frames of ``--size``^2, uint8 as stored), and runs the evaluation loop of stage
evaluate on them batch by batch, timing separately:

- forecasting: the forecaster's call (model forward in inference mode; persistence; pysteps
  Lucas-Kanade + semi-Lagrangian extrapolation);
- scoring: ``ScoreAccumulator.update`` with the stage's settings (6 thresholds x 12 leads, pooled
  CSI at 4 and 16, MSE/MAE, SSIM), and the same without SSIM, to show what SSIM costs.

On CUDA each timed span ends with ``torch.cuda.synchronize()`` (the stage itself never syncs per
batch). Prints windows/s for each part and, as same-run ratios, the scoring time against the model's
forward pass. One warm-up batch is not timed. Figures are medians over ``--repeat`` passes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from pipeline import config as config_mod  # noqa: E402
from pipeline.scoring import ScoreAccumulator  # noqa: E402
from pipeline.scoring.forecasters import ModelForecaster, get_method  # noqa: E402


def storm_windows(n: int, frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, frames, 1, size, size) uint8: a few Gaussian cells drifting across the frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((n, frames, size, size), np.float32)
    for i in range(n):
        for _ in range(4):
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            vy, vx = rng.uniform(-1.5, 1.5, 2)
            peak, sigma = rng.uniform(100, 250), rng.uniform(0.04, 0.1) * size
            for f in range(frames):
                out[i, f] += peak * np.exp(-((yy - cy - vy * f) ** 2 + (xx - cx - vx * f) ** 2) / (2 * sigma**2))
    return torch.from_numpy(out.clip(0, 255).round().astype(np.uint8)).unsqueeze(2)


def timed(device: torch.device, fn, *args):
    """``fn(*args)`` and its wall time, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def one_pass(forecasters, windows, in_len, out_len, batch, device, cfg):
    """Seconds spent per forecaster: {"forecast": s, "score": s, "score_no_ssim": s}."""
    spent = {name: {"forecast": 0.0, "score": 0.0, "score_no_ssim": 0.0} for name in forecasters}
    accs = {name: ScoreAccumulator.from_config(cfg.evaluate, out_len, device) for name in forecasters}
    accs_plain = {
        name: ScoreAccumulator(
            thresholds=cfg.evaluate.thresholds,
            pool_sizes=cfg.evaluate.pool_sizes,
            out_len=out_len,
            ssim=False,
            device=device,
        )  # fmt: skip
        for name in forecasters
    }
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch].to(device)
        inputs, targets = chunk[:, :in_len], chunk[:, in_len : in_len + out_len]
        for name, forecaster in forecasters.items():
            pred, t_fc = timed(device, forecaster, inputs, out_len)
            _, t_sc = timed(device, accs[name].update, pred, targets)
            _, t_sp = timed(device, accs_plain[name].update, pred, targets)
            spent[name]["forecast"] += t_fc
            spent[name]["score"] += t_sc
            spent[name]["score_no_ssim"] += t_sp
    for acc in accs.values():
        acc.compute()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="frame side (default: the params' frame size)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-optical-flow", action="store_true", help="skip the (CPU, per-window) optical flow")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = config_mod.load(args.params)
    device = torch.device("cuda" if args.device in {"auto", "cuda"} and torch.cuda.is_available() else "cpu")
    size = args.size or cfg.frame_size() or 128
    in_len, out_len = cfg.windows.in_len, cfg.windows.out_len
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"

    torch.manual_seed(0)
    forecasters = {"model": ModelForecaster(models.build(cfg.model), device=device, precision=precision),
                   "persistence": get_method("persistence")}  # fmt: skip
    if not args.no_optical_flow:
        forecasters["optical_flow"] = get_method("optical_flow")
    windows = storm_windows(args.windows + args.batch, in_len + out_len, size)
    warmup, windows = windows[: args.batch], windows[args.batch :]

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", threads {torch.get_num_threads()}, cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"model {cfg.model.name} ({sum(p.numel() for p in forecasters['model'].model.parameters()) / 1e6:.2f} M params, "
          f"{precision}), windows {args.windows} x ({in_len} + {out_len}) x {size}^2, batch {args.batch}, "
          f"scores: {len(cfg.evaluate.thresholds)} thresholds, pool {cfg.evaluate.pool_sizes}, SSIM {cfg.evaluate.ssim}")  # fmt: skip

    one_pass(forecasters, warmup, in_len, out_len, args.batch, device, cfg)
    passes = [one_pass(forecasters, windows, in_len, out_len, args.batch, device, cfg) for _ in range(args.repeat)]
    med = {n: {k: statistics.median(p[n][k] for p in passes) for k in passes[0][n]} for n in forecasters}

    n = args.windows
    print()
    print(
        f"{'forecaster':<14}{'forecast w/s':>14}{'scoring w/s':>13}{'no-SSIM w/s':>13}{'end-to-end w/s':>16}{'score share':>13}"
    )
    for name, s in med.items():
        total = s["forecast"] + s["score"]
        print(f"{name:<14}{n / s['forecast']:>14.1f}{n / s['score']:>13.1f}{n / s['score_no_ssim']:>13.1f}"
              f"{n / total:>16.2f}{s['score'] / total:>12.1%}")  # fmt: skip
    fwd = med["model"]["forecast"]
    score = med["model"]["score"]
    print()
    print(f"scoring / model forward: {score / fwd:.3f}  (without SSIM: {med['model']['score_no_ssim'] / fwd:.3f}); "
          f"SSIM is {1 - med['model']['score_no_ssim'] / score:.0%} of the scoring time")  # fmt: skip
    if "optical_flow" in med:
        print(f"optical flow forecast / model forward: {med['optical_flow']['forecast'] / fwd:.2f}")
    print(f"scoring per window: {score / n * 1e3:.1f} ms ({out_len} frames of {size}^2)")


if __name__ == "__main__":
    main()
