"""Forecasters behind one interface, as in pysteps ``get_method``.

A forecaster is any callable ``forecaster(inputs, out_len) -> forecast`` mapping inputs
``(B, T_in, 1, H, W)`` to ``(B, out_len, 1, H, W)`` on the same device. Inputs are uint8 0-255
(the stored windows) or float on the 0-1 scale; a float forecast is on the 0-1 scale, a uint8
forecast on 0-255 (:class:`pipeline.scoring.ScoreAccumulator` scores both the same way).

- ``persistence``: the last input frame, repeated; keeps the input dtype, so stored uint8 frames
  stay exact integers.
- ``optical_flow``: pysteps' dense Lucas-Kanade motion field (OpenCV feature tracking) from the
  last ``n_frames`` inputs, then pysteps' semi-Lagrangian extrapolation of the last frame.
  Rain advected in from outside the frame is unknown (NaN in pysteps) and set to 0.
- ``model``: a trained network from a checkpoint (:func:`model_from_checkpoint`) or an MLflow
  model URI (:func:`model_from_uri`, e.g. ``models:/sevir-nowcaster@champion``), run in phase 2
  (inference) under ``torch.inference_mode``, with bf16/fp16 autocast on CUDA when asked.

``get_method(name, **kwargs)`` builds any of them by name (``get_method("model", checkpoint=PATH)``
or ``get_method("model", model_uri=URI)``); ``BASELINES`` lists the baselines.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Forecaster = Callable[[torch.Tensor, int], torch.Tensor]


class Persistence:
    """The last input frame, repeated ``out_len`` times (a view: no copy)."""

    name = "persistence"

    def __call__(self, inputs: torch.Tensor, out_len: int) -> torch.Tensor:
        return inputs[:, -1:].expand(-1, out_len, -1, -1, -1)  # (B, out_len, 1, H, W), input dtype


def _pysteps():
    """pysteps' motion and extrapolation modules (imported quietly: pysteps prints its config path)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from pysteps import extrapolation, motion
    return motion, extrapolation


class OpticalFlow:
    """Lucas-Kanade motion from the last ``n_frames`` inputs + semi-Lagrangian extrapolation (pysteps).

    Runs on the CPU in numpy, one window at a time, on the 0-255 scale; returns float32 on the 0-1
    scale on the inputs' device.
    """

    name = "optical_flow"

    def __init__(self, n_frames: int = 3, method: str = "lucaskanade"):
        if n_frames < 2:
            raise ValueError("optical flow needs at least 2 input frames")
        self.n_frames = n_frames
        motion, extrapolation = _pysteps()
        self._motion = motion.get_method(method)
        self._extrapolate = extrapolation.get_method("semilagrangian")

    def __call__(self, inputs: torch.Tensor, out_len: int) -> torch.Tensor:
        b, t_in, _, h, w = inputs.shape
        if t_in < self.n_frames:
            raise ValueError(f"optical flow uses the last {self.n_frames} input frames; got {t_in}")
        frames = inputs[:, -self.n_frames :, 0].detach().to("cpu")
        vil = frames.numpy().astype(np.float64) if frames.dtype == torch.uint8 else frames.double().numpy() * 255.0
        out = np.empty((b, out_len, h, w), dtype=np.float32)
        for i in range(b):
            with warnings.catch_warnings():
                # pysteps' outlier test takes a covariance of the tracked vectors; with very few
                # features (a nearly dry window) numpy warns about degrees of freedom; the field is still valid
                warnings.simplefilter("ignore", RuntimeWarning)
                velocity = self._motion(vil[i], verbose=False)  # (2, H, W) pixels per frame
            forecast = self._extrapolate(vil[i, -1], velocity, out_len)  # (out_len, H, W), NaN = from outside
            out[i] = np.nan_to_num(forecast, nan=0.0) / 255.0
        return torch.from_numpy(out).unsqueeze(2).to(inputs.device)  # (B, out_len, 1, H, W) 0-1


class ModelForecaster:
    """A network as a forecaster: uint8 or 0-1 inputs -> float 0-1 forecast, phase 2, no gradients."""

    name = "model"

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", precision: str = "fp32",
                 data: dict[str, int] | None = None, frame_minutes: int | None = None):  # fmt: skip
        self.data = data  # {"in_len", "out_len", "height", "width"} the network was trained on, when known
        self.frame_minutes = frame_minutes
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def __call__(self, inputs: torch.Tensor, out_len: int) -> torch.Tensor:
        x = inputs.to(self.device, non_blocking=True)
        x = x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None and self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = self.model(x, out_len, phase=2)
        return out.float()


BASELINES: dict[str, Callable[..., Forecaster]] = {"persistence": Persistence, "optical_flow": OpticalFlow}


def get_method(name: str, **kwargs: Any) -> Forecaster:
    """A forecaster by name, like pysteps ``get_method``: a baseline (``persistence``, ``optical_flow``)
    or ``model`` with ``checkpoint=PATH`` or ``model_uri=URI`` (plus ``device``, ``precision``)."""
    if name == "model":
        checkpoint, uri = kwargs.pop("checkpoint", None), kwargs.pop("model_uri", None)
        if (checkpoint is None) == (uri is None):
            raise ValueError("forecaster 'model' takes exactly one of checkpoint=PATH or model_uri=URI")
        return model_from_checkpoint(Path(checkpoint), **kwargs) if uri is None else model_from_uri(uri, **kwargs)
    try:
        return BASELINES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown forecaster {name!r}; known: model, {', '.join(BASELINES)}") from None


def model_from_checkpoint(path: Path, model_cfg: Any = None, device: torch.device | str = "cpu",
                          precision: str = "fp32") -> ModelForecaster:  # fmt: skip
    """The network of a training checkpoint (``weights_only=True``) as a forecaster.

    ``model_cfg`` (a ``ModelConfig``), when given, must equal the checkpoint's: a difference raises
    :class:`pipeline.errors.ConfigError` naming the differing ``model.*`` keys.
    """
    from pipeline.training.checkpoint import load_model, read_checkpoint

    data = read_checkpoint(Path(path)).get("data")
    return ModelForecaster(load_model(Path(path), model_cfg, device=device), device=device, precision=precision,
                           data=dict(data) if isinstance(data, dict) else None)  # fmt: skip


def model_from_uri(uri: str, device: torch.device | str = "cpu", precision: str = "fp32") -> ModelForecaster:
    """The network of an MLflow model (as logged by the evaluate stage, see
    :mod:`pipeline.scoring.nowcaster_model`) as a forecaster; ``uri`` is any MLflow model URI
    (``models:/sevir-nowcaster@champion``, ``models:/sevir-nowcaster/3``, ``runs:/<id>/model``).

    Uses the current tracking / registry URI. A URI that does not resolve, or a model that is not
    one of this project's, raises :class:`pipeline.errors.DataError` naming the URI.
    """
    import mlflow

    from pipeline.errors import DataError

    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except Exception as err:  # noqa: BLE001 - MlflowException, OSError, ...: one line naming the URI
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DataError(f"{uri}: MLflow model not loadable ({first}); check the URI, the tracking store "
                        "(tracking.uri / MLFLOW_TRACKING_URI) and that the evaluate stage logged it") from None  # fmt: skip
    wrapper = loaded.unwrap_python_model() if hasattr(loaded, "unwrap_python_model") else None
    network = getattr(wrapper, "network", None)
    if not isinstance(network, nn.Module):
        raise DataError(f"{uri}: not a nowcaster model of this project (no network in its pyfunc); "
                        "log one with the evaluate stage")  # fmt: skip
    return ModelForecaster(network, device=device, precision=precision, data=dict(wrapper.data),
                           frame_minutes=wrapper.frame_minutes)  # fmt: skip
