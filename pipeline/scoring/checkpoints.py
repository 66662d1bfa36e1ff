"""Reading training checkpoints for evaluation (the contract of CONTRACTS.md section 1).

The training package owns the checkpoint format and provides ``read_checkpoint`` and
``load_model`` in ``pipeline.training.checkpoint``; this module uses those when that package is
present. Until it lands, the same two functions are implemented here against the same contract
(a plain dict: ``format``, ``model`` state dict, ``model_config``, ``data`` {in_len, out_len,
height, width}, ``config_hash``, ``phase``, ``epoch``, ``step``, ``best_key``, ``best_score``),
so evaluation works on checkpoints of that shape either way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError, DataError, PipelineError

REQUIRED_KEYS = ("format", "model", "model_config", "data")


def config_differences(stored: Any, wanted: Any, prefix: str = "model") -> list[str]:
    """Dotted keys whose values differ between two (nested) config dicts, e.g. ``["model.embed_dim"]``."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        keys = sorted(set(stored) | set(wanted))
        return [d for k in keys for d in config_differences(stored.get(k), wanted.get(k), f"{prefix}.{k}")]
    return [] if stored == wanted else [prefix]


def _read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found; run the training stage that writes it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise DataError(f"{path}: not a readable checkpoint ({type(err).__name__}); rerun training to rewrite it") from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in REQUIRED_KEYS):
        raise DataError(f"{path}: not a pipeline checkpoint (needs keys {', '.join(REQUIRED_KEYS)}); rerun training")
    if ckpt["format"] != 1:
        raise DataError(f"{path}: checkpoint format {ckpt['format']!r} is not supported (expected 1); rerun training")
    return ckpt


def _load_model(path: Path, model_cfg: Any = None, device: torch.device | str = "cpu") -> nn.Module:
    import models
    from models.config import ModelConfig

    ckpt = _read_checkpoint(path)
    stored = ModelConfig.model_validate(ckpt["model_config"])
    if model_cfg is not None:
        differing = config_differences(stored.model_dump(mode="json"), model_cfg.model_dump(mode="json"))
        if differing:
            raise ConfigError(
                f"{path}: checkpoint was trained with another model config ({', '.join(differing)} differ from params.yaml); "
                "retrain (dvc repro) or restore those params"
            )
    model = models.build(stored)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit model.{stored.name} ({str(err).splitlines()[0]}); rerun training") from None
    return model.to(device).eval()


def _owner_available() -> bool:
    try:
        return importlib.util.find_spec("pipeline.training.checkpoint") is not None
    except ModuleNotFoundError:  # no pipeline.training package yet
        return False


if _owner_available():
    from pipeline.training.checkpoint import load_model, read_checkpoint  # noqa: F401  (the owner's implementation)
else:
    read_checkpoint = _read_checkpoint
    load_model = _load_model
