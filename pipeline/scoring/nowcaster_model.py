"""The trained nowcaster as an MLflow model (pyfunc, "models from code"): weights and config, no pickles.

Why not ``mlflow.pytorch.log_model``: its default ``pickle`` format saves the whole module with
``torch.save`` (pickled code), and loading it unpickles a file, which this project never does with
user files. Its ``pt2`` format (``torch.export``) traces one graph for fixed shapes and arguments;
the recurrent networks here take ``out_len`` and ``phase`` as Python arguments and loop over
frames, which exports poorly and would freeze the lead count. So the model is logged as a pyfunc
whose artifacts are plain data:

- ``weights``: the network's ``state_dict`` (``torch.save`` of tensors only), read back with
  ``torch.load(..., weights_only=True)``;
- ``config``: JSON ``{"model_config": cfg.model, "data": {"in_len", "out_len", "height", "width"},
  "frame_minutes"}``.

This file is the model's code (MLflow "models from code": it is copied into the logged model and
run at load time, no ``python_model.pkl``); :meth:`NowcasterModel.load_context` rebuilds the
network with ``models.build(ModelConfig(**config))``. The ``models`` package is logged beside it
(``code_paths``), so the logged model carries the network code it was trained with.

``predict`` takes a float32 array ``(B, in_len, 1, H, W)`` on the 0-1 scale (VIL / 255) and returns
the forecast ``(B, out_len, 1, H, W)`` on the same scale, on the CPU. In Python::

    model = mlflow.pyfunc.load_model("models:/sevir-nowcaster@champion")
    forecast = model.predict(x)                    # numpy, 0-1
    network = model.unwrap_python_model().network  # the torch module, eval mode
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import torch


class NowcasterModel(mlflow.pyfunc.PythonModel):
    """A network rebuilt from its config and weights; ``predict`` runs it in phase 2 (inference)."""

    network: torch.nn.Module
    data: dict[str, int]
    frame_minutes: int | None

    def load_context(self, context: Any) -> None:
        from models import build
        from models.config import ModelConfig

        with open(context.artifacts["config"]) as fh:
            config = json.load(fh)
        network = build(ModelConfig(**config["model_config"]))
        weights = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        network.load_state_dict(weights)
        self.network = network.eval()
        self.data = {k: int(v) for k, v in config["data"].items()}
        self.frame_minutes = config.get("frame_minutes")

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - untyped: MLflow reads type hints as a schema
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.ndim == 4:  # (B, T, H, W): add the channel axis
            x = x.unsqueeze(2)
        with torch.inference_mode():
            out = self.network(x, int(self.data["out_len"]), phase=2)
        return out.float().numpy()


mlflow.models.set_model(NowcasterModel())
