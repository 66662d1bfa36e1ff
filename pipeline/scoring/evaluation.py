"""Score forecasters on a windows file: the loop behind stage evaluate.

Every forecaster sees the same batches and is scored by its own
:class:`~pipeline.scoring.ScoreAccumulator` with the same settings, so the model and the
baselines are compared by the same code. Predictions are never kept: each batch is scored and
dropped. The heavy-rain windows for the gallery are picked on the fly (truth pixels at or above
the gallery threshold, one number per window kept on the device) and forecast again at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import h5py
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import sevir
from pipeline.errors import DataError
from pipeline.scoring.forecasters import Forecaster
from pipeline.scoring.scores import ScoreAccumulator
from pipeline.sevir.dataset import WindowDataset

log = logging.getLogger("pipeline.scoring.evaluation")

HEAVY_RAIN = 133  # VIL level whose truth coverage ranks windows for the gallery


@dataclass
class Evaluation:
    """Scores of every forecaster on one split, and the windows drawn in the gallery."""

    scores: dict[str, dict[str, Any]]  # forecaster -> ScoreAccumulator.compute()
    windows: int
    examples: list[int] = field(default_factory=list)  # dataset indices, heaviest rain first


def open_windows(path: Path, data: dict[str, int] | None = None) -> WindowDataset:
    """The windows file of a split as uint8 items, checked against the model's ``data`` block.

    ``data`` (the checkpoint's ``{"in_len", "out_len", "height", "width"}``) must fit the file:
    same frame size, and at least the model's input and target lengths in each window (shorter
    requests are cut by :class:`WindowDataset`). An empty split is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: windows file not found; run the chunk stage (dvc repro chunk)")
    probe = WindowDataset(path, raw=True)
    if data is not None:
        height, width = probe.frame_shape
        if (height, width) != (data["height"], data["width"]):
            raise DataError(
                f"{path}: frames are {height}x{width} but the model was trained on {data['height']}x{data['width']}; "
                "rerun chunk and training with the same windows.* / data.* settings (dvc repro)"
            )
        if data["in_len"] > probe.in_len or data["out_len"] > probe.out_len:
            raise DataError(
                f"{path}: windows hold {probe.in_len} input + {probe.out_len} target frames but the model needs "
                f"{data['in_len']} + {data['out_len']}; rerun chunk and training with the same windows.in_len/out_len"
            )
        dataset = WindowDataset(path, in_len=data["in_len"], out_len=data["out_len"], raw=True)
    else:
        dataset = probe
    if len(dataset) == 0:
        raise DataError(
            f"{path}: the {path.stem} split holds no windows; move data.split dates or add events (data.synthetic.n_events)"
        )
    return dataset


def frame_minutes(path: Path) -> int:
    """Minutes between consecutive frames of a windows file: lead ``j`` (1-based) is ``j`` times this.

    Read from the file's ``frame_minutes`` attribute (stage chunk writes ``frame_step`` x 5 min);
    a file written before chunk stored it gets ``frame_step`` x 5 (``frame_step`` 1 when that is
    missing too), and the fallback is logged.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            attrs = {key: h5.attrs[key] for key in ("frame_minutes", "frame_step") if key in h5.attrs}
    except OSError as err:
        raise DataError(f"{path}: not a windows file ({err}); rerun the chunk stage") from None
    if "frame_minutes" in attrs:
        key, value = "frame_minutes", attrs["frame_minutes"]
    else:
        key, value = "frame_step", attrs.get("frame_step", 1)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (number >= 1 and number.is_integer()):
        raise DataError(f"{path}: attribute {key} = {value!r} is not a positive whole number; rerun the chunk stage")
    value = int(number)
    if key == "frame_minutes":
        return value
    minutes = value * sevir.FRAME_MINUTES
    log.info("%s: no frame_minutes attribute (an older chunk wrote it); lead times from frame_step %d x %d min = %d min",
             path, value, sevir.FRAME_MINUTES, minutes)  # fmt: skip
    return minutes


def evaluate(dataset: WindowDataset, forecasters: dict[str, Forecaster], evaluate_cfg: Any,
             device: torch.device | str = "cpu", num_workers: int = 0) -> Evaluation:  # fmt: skip
    """Score every forecaster on ``dataset`` (at most ``evaluate_cfg.max_batches`` batches)."""
    device = torch.device(device)
    out_len = dataset.out_len
    loader = DataLoader(dataset, batch_size=evaluate_cfg.batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")  # fmt: skip
    n_batches = len(loader) if not evaluate_cfg.max_batches else min(len(loader), evaluate_cfg.max_batches)
    accumulators = {name: ScoreAccumulator.from_config(evaluate_cfg, out_len, device) for name in forecasters}
    heavy: list[torch.Tensor] = []
    for batch in tqdm(islice(loader, n_batches), total=n_batches, desc="evaluate", unit="batch", leave=False):
        inputs = batch["inputs"].to(device, non_blocking=True)  # (B, T_in, 1, H, W) uint8
        targets = batch["targets"].to(device, non_blocking=True)  # (B, T_out, 1, H, W) uint8
        for name, forecaster in forecasters.items():
            accumulators[name].update(forecaster(inputs, out_len), targets)
        heavy.append((targets >= HEAVY_RAIN).flatten(1).sum(1))
    windows = next(iter(accumulators.values())).windows if accumulators else 0
    coverage = torch.cat(heavy).cpu() if heavy else torch.zeros(0)
    n_examples = min(evaluate_cfg.n_examples, int(coverage.numel()))
    examples = coverage.topk(n_examples).indices.tolist() if n_examples else []
    scores = {name: acc.compute() for name, acc in accumulators.items()}
    log.info("evaluate: %d windows, %s", windows,
             ", ".join(f"{n} CSI-M {_fmt(s['csi_m'])}" for n, s in scores.items()))  # fmt: skip
    return Evaluation(scores=scores, windows=windows, examples=examples)


def forecast_examples(dataset: WindowDataset, forecasters: dict[str, Forecaster], indices: list[int],
                      device: torch.device | str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Inputs, truth and every forecaster's frames of a few windows, as numpy on the 0-255 scale.

    Returns ``{"inputs": (N, T_in, H, W), "truth": (N, T_out, H, W), "forecasts": {name: (N, T_out, H, W)}}``.
    """
    if not indices:
        return {"inputs": None, "truth": None, "forecasts": {}}
    items = [dataset[i] for i in indices]
    inputs = torch.stack([it["inputs"] for it in items]).to(device)
    truth = torch.stack([it["targets"] for it in items])
    forecasts = {}
    for name, forecaster in forecasters.items():
        pred = forecaster(inputs, dataset.out_len).detach().cpu()
        pred = pred.float() if pred.dtype == torch.uint8 else pred.float() * 255.0
        forecasts[name] = pred[:, :, 0].clamp(0, 255).numpy()
    return {
        "inputs": inputs[:, :, 0].cpu().float().numpy(),
        "truth": truth[:, :, 0].float().numpy(),
        "forecasts": forecasts,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
