"""Training checkpoints: atomic writes, safe reads, the config hash that decides whether to resume.

File layout (``<train.checkpoint_dir>/phase{1,2}/last.pt`` and ``best.pt``): a plain dict written
with ``torch.save`` and read back with ``torch.load(..., weights_only=True)`` (no pickled code)::

    format        1
    model         state_dict of the unwrapped model (no "module." / "_orig_mod." prefixes);
                  the EMA weights when EMA is on
    model_config  cfg.model as JSON-able data
    data          {"in_len", "out_len", "height", "width"}
    config_hash   hash of everything that shapes the model, the data and this phase's optimisation
    phase, epoch, step, best_key, best_score
    training-only state, ignored by readers: train_model (raw weights when EMA is on), optimizer,
    scheduler, scaler, rng (torch, cuda, numpy, python), history, best_epoch, bad_epochs, finished

Everything is written to a temporary file in the same folder, flushed and fsynced, then renamed
over the target: a reader sees the old file or the new one, never half of one, and a killed
process leaves at most a ``*.tmp`` that the next write replaces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError, DataError

log = logging.getLogger("pipeline.training")

FORMAT = 1
# Train settings that change how fast or where a run goes, not what it computes: a change of
# these alone still resumes (device and worker count are the usual ones to change after a crash).
_NOT_HASHED_TRAIN_KEYS = ("device", "compile", "num_workers", "threads", "nproc_per_node", "checkpoint_dir",
                          "log_every", "max_batch_size", "phase1", "phase2")  # fmt: skip


def config_hash(cfg: Any, phase: int, init: dict[str, Any] | None = None) -> str:
    """Hash of the config that shapes phase ``phase``: model, data, windows, train (this phase's block).

    ``init`` is the phase-1 checkpoint a phase-2 run starts from; its identity is part of the hash,
    so a retrained phase 1 never lets phase 2 resume on top of the old one.
    """
    windows = cfg.windows.model_dump(mode="json", exclude={"root", "chunk_events"})
    data = cfg.data.model_dump(mode="json", exclude={"root"})
    train = cfg.train.model_dump(mode="json", exclude=set(_NOT_HASHED_TRAIN_KEYS))
    blob: dict[str, Any] = {
        "model": cfg.model.model_dump(mode="json"),
        "data": data,
        "windows": windows,
        "train": train,
        "phase": phase,
        "phase_cfg": cfg.train.phase(phase).model_dump(mode="json"),
    }
    if init is not None:
        blob["init"] = {k: init.get(k) for k in ("config_hash", "epoch", "step", "best_score")}
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every RNG the training touches, as tensors and plain lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},  # fmt: skip
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npk = state["numpy"]
    np.random.set_state(("MT19937", npk["key"].numpy().astype(np.uint32), npk["pos"], npk["has_gauss"],
                         npk["cached_gaussian"]))  # fmt: skip
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def read_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``.

    A missing, truncated or foreign file raises :class:`DataError` with one line naming the
    path and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; run the training stage (dvc repro train_phase1) first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: corrupt or unreadable checkpoint ({why[:160]}); delete it and rerun the "
                        "training stage") from None  # fmt: skip
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise DataError(f"{path}: not a format-{FORMAT} training checkpoint; delete it and rerun the training stage")
    return state


def load_model(path: Path, model_cfg: Any | None = None, device: Any = "cpu") -> nn.Module:
    """The model stored in checkpoint ``path``, built from its own ``model_config``, in eval mode.

    With ``model_cfg`` given, a stored config that differs raises :class:`ConfigError` naming the
    differing ``model.*`` keys.
    """
    from models import build
    from models.config import ModelConfig

    state = read_checkpoint(path, map_location="cpu")
    stored = ModelConfig.model_validate(state["model_config"])
    if model_cfg is not None:
        diff = _diff_keys(stored.model_dump(mode="json"), model_cfg.model_dump(mode="json"), "model")
        if diff:
            raise ConfigError(f"{path}: checkpoint was trained with other {', '.join(diff)} than params.yaml; "
                              "retrain (dvc repro) or restore those params")  # fmt: skip
    model = build(stored)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit model.name={stored.name} "
                        f"({str(err).splitlines()[0][:120]}); delete the checkpoint and retrain") from None  # fmt: skip
    return model.to(device).eval()


def _diff_keys(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    return [] if a == b else [prefix]
