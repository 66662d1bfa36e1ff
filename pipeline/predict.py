"""Forecast from a trained model: one sequence of VIL frames in, the model's and the baselines' forecasts out.

    python -m pipeline.predict --windows data/windows/test.h5 --window 0 --out reports/predict/forecast.npz
    python -m pipeline.predict --sevir data/raw/vil/2019/SEVIR_VIL_....h5 --index 3 --out f.h5
    python -m pipeline.predict --event-id S728503 [--catalog data/raw/CATALOG.csv] --out f.npz
    python -m pipeline.predict --npy frames.npy --out f.npz          (or --npz FILE [--key frames])
    ... [--checkpoint artifacts/phase2/best.pt | --model-uri models:/sevir-nowcaster@champion]

Inputs (exactly one): frames ``(T, H, W)`` (or with a channel axis of 1), uint8 0-255 or float
0-1; a SEVIR VIL file's event (``vil`` (N, H, W, T) uint8), alone or looked up by id in a catalog;
or a window of a windows file. The last ``in_len`` frames are used. Raw SEVIR frames get the
params file's ``windows.frame_step`` and, when the frames are ``windows.downsample`` times the
model's size, its area-mean downsampling (what stage chunk does); any other size is refused.

The model (:func:`pipeline.scoring.forecasters.get_method` ``"model"``): a training checkpoint,
or an MLflow model URI as the evaluate stage registers it (tracking store from ``tracking.uri`` /
``MLFLOW_TRACKING_URI``). Writes ``--out`` (.npz or .h5): ``forecast`` (the model), ``persistence``
and ``optical_flow`` as uint8 VIL ``(T_out, H, W)``, ``lead_min`` ``(T_out,)`` and ``inputs``; and
beside it ``<stem>.png`` (the last input, then each forecaster at a few leads, SEVIR VIL colours)
and ``<stem>.gif`` (the forecasters side by side over the leads). Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import config as config_mod
from pipeline import sevir
from pipeline.cli import run_stage, setup_logging
from pipeline.errors import DataError, PipelineError
from pipeline.scoring.forecasters import ModelForecaster, get_method
from pipeline.sevir.format import read_catalog_file

log = logging.getLogger("pipeline.predict")

BASELINE_NAMES = ("persistence", "optical_flow")
STRIP_LEADS = 4  # leads drawn in the PNG strip, spread over the forecast


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sevir", type=Path, help="a SEVIR VIL h5 file (with --index)")
    src.add_argument("--event-id", help="a SEVIR event id, looked up in --catalog")
    src.add_argument("--npy", type=Path, help="frames (T, H, W) in a .npy file")
    src.add_argument("--npz", type=Path, help="frames (T, H, W) in a .npz file (array --key)")
    src.add_argument("--windows", type=Path, help="a windows file of stage chunk (with --window)")
    p.add_argument("--index", type=int, default=None, help="event index in the --sevir file")
    p.add_argument("--catalog", type=Path, default=Path("data/raw/CATALOG.csv"), help="catalog for --event-id")
    p.add_argument("--key", default="frames", help="array name in the --npz file (default: frames)")
    p.add_argument("--window", type=int, default=None, help="window index in the --windows file")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: artifacts/phase2/best.pt)")
    model.add_argument("--model-uri", default=None, help="an MLflow model URI, e.g. models:/sevir-nowcaster@champion")
    p.add_argument("--out", type=Path, required=True, help="output file, .npz or .h5")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="params file for windows.frame_step / downsample and tracking.uri (default: params.yaml)")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


# ----------------------------------------------------------------------------------- inputs
def _index(value: int | None, flag: str, n: int, path: Path, what: str) -> int:
    if value is None:
        raise DataError(f"{path}: say which {what} with {flag} N (the file holds {n})")
    if not 0 <= value < n:
        raise DataError(f"{path}: {flag} {value} out of range; the file holds {n} {what}s (0..{n - 1})")
    return value


def _sevir_event(path: Path, index: int | None) -> np.ndarray:
    """Event ``index`` of a SEVIR VIL file as uint8 (T, H, W)."""
    if not path.is_file():
        raise DataError(f"{path}: SEVIR VIL file not found; fix --sevir")
    with sevir.VilFile(path) as vil:
        i = _index(index, "--index", vil.n_events, path, "event")
        return np.ascontiguousarray(np.moveaxis(vil.read(i)[0], -1, 0))


def _catalog_event(event_id: str, catalog_path: Path) -> np.ndarray:
    catalog = read_catalog_file(catalog_path, missing="fix --catalog or run the fetch stage (dvc repro fetch)",
                                      unreadable="fix --catalog", not_sevir="pass a SEVIR CATALOG.csv")  # fmt: skip
    rows = sevir.vil_rows(catalog)
    found = rows[rows["id"].astype(str) == str(event_id)]
    if found.empty:
        raise DataError(
            f"{catalog_path}: no VIL event with id {event_id!r}; fix --event-id (ids are the catalog's id column)"
        )
    row = found.iloc[0]
    path = sevir.safe_join(sevir.data_root_of(catalog_path.parent), str(row["file_name"]))
    if not path.is_file():
        raise DataError(f"{path}: VIL file of event {event_id} not found; rerun fetch (dvc repro fetch)")
    return _sevir_event(path, int(row["file_index"]))


def _array_file(path: Path, key: str | None) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: input file not found; fix --{'npz' if key is not None else 'npy'}")
    try:
        if key is None:
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise DataError(f"{path}: no array {key!r} (holds {', '.join(npz.files) or 'none'}); pass --key NAME")
            return npz[key]
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable numpy file ({str(err).splitlines()[0][:120]}); fix the file") from None


def _window(path: Path, index: int | None) -> tuple[np.ndarray, int]:
    from pipeline.scoring.evaluation import frame_minutes, open_windows

    dataset = open_windows(path)
    i = _index(index, "--window", len(dataset), path, "window")
    return dataset[i]["inputs"][:, 0].numpy(), frame_minutes(path)


def as_frames(x: np.ndarray, what: str) -> np.ndarray:
    """Frames as uint8 VIL (T, H, W): a channel axis of 1 dropped, floats (0-1) scaled to 0-255.

    Out-of-range values (negative, NaN, above 255 for integers or above 1 for floats) are a DataError."""
    x = np.asarray(x)
    if x.ndim == 4 and 1 in (x.shape[1], x.shape[-1]):
        x = x[:, 0] if x.shape[1] == 1 else x[..., 0]
    if x.ndim != 3:
        raise DataError(f"{what}: frames are shaped {x.shape}; expected (T, H, W) or (T, 1, H, W)")
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{what}: frames are {x.dtype}; expected uint8 0-255 or float 0-1")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{what}: frames hold NaN or inf; expected float VIL on the 0-1 scale")
        lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
        if lo < 0 or hi > 1:
            raise DataError(f"{what}: float frames range {lo:g}..{hi:g}; expected 0-1 (VIL / 255)")
        return np.rint(x.astype(np.float64) * 255.0).astype(np.uint8)
    lo, hi = int(x.min(initial=0)), int(x.max(initial=0))
    if lo < 0 or hi > 255:
        raise DataError(f"{what}: integer frames range {lo}..{hi}; expected uint8 VIL 0-255")
    return x.astype(np.uint8)


def prepare(
    frames: np.ndarray, data: dict[str, int], what: str, frame_step: int = 1, downsample: int = 1
) -> np.ndarray:
    """The model's input (in_len, H, W) uint8: every ``frame_step``-th frame, downsampled by ``downsample`` when
    that gives the model's size, the last ``in_len`` frames. Other sizes or too few frames are a DataError."""
    frames = frames[::frame_step] if frame_step > 1 else frames
    t, h, w = frames.shape
    mh, mw = data["height"], data["width"]
    if (h, w) != (mh, mw):
        if downsample > 1 and (h, w) == (mh * downsample, mw * downsample):
            from pipeline.sevir.windows import downsample as area_mean

            frames = np.moveaxis(area_mean(np.moveaxis(frames, 0, -1), downsample), -1, 0)
        else:
            raise DataError(f"{what}: frames are {h}x{w} but the model takes {mh}x{mw}"
                            + (f" (or {mh * downsample}x{mw * downsample} raw at windows.downsample = {downsample})"
                               if downsample > 1 else "") + "; resize them or use a model trained on this size")  # fmt: skip
    if t < data["in_len"]:
        raise DataError(f"{what}: {t} frames{f' (every {frame_step}th kept)' if frame_step > 1 else ''} but the model "
                        f"needs {data['in_len']} input frames; pass a longer sequence")  # fmt: skip
    return np.ascontiguousarray(frames[-data["in_len"] :])


# ----------------------------------------------------------------------------------- outputs
def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_forecasts(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> Path:
    """``arrays`` to ``path`` (.npz or .h5 by suffix), written to a temporary file then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        if path.suffix == ".npz":
            np.savez_compressed(tmp, **arrays, **{k: np.asarray(v) for k, v in attrs.items()})
        else:
            import h5py

            with h5py.File(tmp, "w") as h5:
                for key, value in arrays.items():
                    h5.create_dataset(key, data=value, compression="gzip")
                h5.attrs.update(attrs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _labels(names: list[str]) -> list[str]:
    from pipeline.scoring.reports import FORECASTER_LABELS

    return [FORECASTER_LABELS.get(n, n) for n in names]


def plot_strip(path: Path, last_input: np.ndarray, forecasts: dict[str, np.ndarray], lead_min: np.ndarray) -> Path:
    """One row per forecaster: the last input, then the forecast at up to :data:`STRIP_LEADS` leads."""
    from pipeline.scoring.reports import VIL_LEVELS, _pyplot, _save, vil_colormap

    plt = _pyplot()
    cmap, norm = vil_colormap()
    out_len = len(lead_min)
    leads = sorted({int(round(i)) for i in np.linspace(0, out_len - 1, min(STRIP_LEADS, out_len))})
    names = list(forecasts)
    fig, axes = plt.subplots(len(names), len(leads) + 1, figsize=(1.8 * (len(leads) + 1) + 0.8, 1.9 * len(names)),
                             squeeze=False)  # fmt: skip
    image = None
    for r, (name, label) in enumerate(zip(names, _labels(names), strict=True)):
        for c in range(len(leads) + 1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            frame = last_input if c == 0 else forecasts[name][leads[c - 1]]
            image = ax.imshow(frame, cmap=cmap, norm=norm, interpolation="nearest")
            if r == 0:
                ax.set_title("last input" if c == 0 else f"+{int(lead_min[leads[c - 1]])} min", fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.88, top=0.92, bottom=0.03, wspace=0.05, hspace=0.08)
    bar = fig.colorbar(image, cax=fig.add_axes((0.9, 0.15, 0.02, 0.7)), ticks=VIL_LEVELS)
    bar.set_label("VIL (0-255 scale)")
    bar.ax.tick_params(labelsize=7)
    tmp = _tmp(path)
    try:
        _save(fig, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def animate(path: Path, forecasts: dict[str, np.ndarray], lead_min: np.ndarray, fps: int = 3) -> Path:
    """An animated GIF: the forecasters side by side, one frame per lead (matplotlib's PillowWriter)."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    from pipeline.scoring.reports import _pyplot, vil_colormap

    plt = _pyplot()
    cmap, norm = vil_colormap()
    names = list(forecasts)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.9), squeeze=False)
    images = []
    for ax, name, label in zip(axes[0], names, _labels(names), strict=True):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=9)
        images.append(ax.imshow(forecasts[name][0], cmap=cmap, norm=norm, interpolation="nearest"))
    caption = fig.suptitle("", fontsize=10)

    def draw(j: int) -> list[Any]:
        for image, name in zip(images, names, strict=True):
            image.set_data(forecasts[name][j])
        caption.set_text(f"+{int(lead_min[j])} min")
        return [*images, caption]

    tmp = _tmp(path)
    try:
        FuncAnimation(fig, draw, frames=len(lead_min), blit=False).save(tmp, writer=PillowWriter(fps=fps), dpi=80)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- main
def _load_model(args: argparse.Namespace, cfg: Any) -> ModelForecaster:
    if args.model_uri:
        import mlflow

        from pipeline.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(cfg.tracking.uri))
        return get_method("model", model_uri=args.model_uri)
    path = args.checkpoint or cfg.train.checkpoint_dir / "phase2" / "best.pt"
    return get_method("model", checkpoint=path)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.out.suffix not in (".npz", ".h5"):
        raise PipelineError(f"--out {args.out}: use a .npz or .h5 file name")
    cfg = config_mod.load(args.params) if args.params.is_file() else config_mod.from_dict({})
    model = _load_model(args, cfg)
    data = model.data
    if not data:
        raise DataError("the model does not record its input size (data block); retrain it (dvc repro train_phase2)")
    minutes = model.frame_minutes or cfg.windows.frame_step * sevir.FRAME_MINUTES
    if args.windows is not None:
        raw, minutes = _window(args.windows, args.window)
        frames = prepare(as_frames(raw, str(args.windows)), data, str(args.windows))
    else:
        if args.sevir is not None:
            raw, what = _sevir_event(args.sevir, args.index), str(args.sevir)
        elif args.event_id is not None:
            raw, what = _catalog_event(args.event_id, args.catalog), f"event {args.event_id}"
        elif args.npy is not None:
            raw, what = _array_file(args.npy, None), str(args.npy)
        else:
            raw, what = _array_file(args.npz, args.key), f"{args.npz}[{args.key}]"
        raw_sevir = args.sevir is not None or args.event_id is not None
        step = cfg.windows.frame_step if raw_sevir else 1
        frames = prepare(as_frames(raw, what), data, what, frame_step=step, downsample=cfg.windows.downsample)
        minutes = minutes if not raw_sevir else cfg.windows.frame_step * sevir.FRAME_MINUTES

    out_len = data["out_len"]
    x = torch.from_numpy(frames).unsqueeze(0).unsqueeze(2)  # (1, in_len, 1, H, W) uint8
    forecasters = {"model": model, **{name: get_method(name) for name in BASELINE_NAMES}}
    forecasts: dict[str, np.ndarray] = {}
    for name, forecaster in forecasters.items():
        y = forecaster(x, out_len)[0, :, 0].cpu()
        y = y.numpy() if y.dtype == torch.uint8 else np.rint(y.float().clamp(0, 1).numpy() * 255.0).astype(np.uint8)
        forecasts[name] = np.ascontiguousarray(y)
    lead_min = np.arange(1, out_len + 1, dtype=np.int32) * int(minutes)
    arrays = {"forecast": forecasts["model"], **{n: forecasts[n] for n in BASELINE_NAMES}, "lead_min": lead_min,
              "inputs": frames}  # fmt: skip
    source = args.model_uri or str(args.checkpoint or cfg.train.checkpoint_dir / "phase2" / "best.pt")
    out = write_forecasts(args.out, arrays, {"frame_minutes": int(minutes), "model": source})
    png = plot_strip(args.out.with_suffix(".png"), frames[-1], forecasts, lead_min)
    gif = animate(args.out.with_suffix(".gif"), forecasts, lead_min)
    log.info("predict: %d x %d-minute leads from %s -> %s, %s, %s", out_len, minutes, source, out, png, gif)


def cli() -> int:
    """The ``sevir-predict`` console script (``pip install .``): the same as ``python -m pipeline.predict``."""
    return run_stage(main)


if __name__ == "__main__":
    raise SystemExit(cli())
