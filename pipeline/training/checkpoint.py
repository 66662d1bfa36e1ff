"""Training checkpoints: atomic writes, safe reads, the config hash that decides whether to resume.

File layout (``<train.checkpoint_dir>/phase{1,2}/last.pt`` and ``best.pt``): a plain dict written
with ``torch.save`` and read back with ``torch.load(..., weights_only=True)`` (no pickled code)::

    format        1
    model         state_dict of the unwrapped model (no "module." / "_orig_mod." prefixes);
                  the EMA weights when EMA is on
    model_config  cfg.model as JSON-able data
    data          {"in_len", "out_len", "height", "width"}
    identity      {"params", "code", "data"}: what the checkpoint was made from (:func:`identity`)
    config_hash   one hash of ``identity`` (the MLflow param ``train.config_hash``)
    phase, epoch, step, best_key, best_score
    training-only state, ignored by readers: train_model (raw weights when EMA is on), optimizer,
    scheduler, scaler, rng (torch, cuda, numpy, python), history, best_epoch, bad_epochs, finished

A kept ``last.pt`` is resumed only when all three parts of its identity equal the current run's:
``params`` (the params.yaml keys that shape this phase, the validation scores' included, and for
phase 2 the identity of the phase-1 checkpoint it starts from), ``code`` (every ``*.py`` under
``models/``, ``pipeline/training/`` and ``pipeline/scoring/``, whose validation scores pick ``best.pt``,
and ``pipeline/train.py``) and ``data`` (the windows files ``train.h5`` and ``val.h5``, by content,
see :func:`data_fingerprint`). Anything else is trained
from scratch. Weights that do not fit the model (:func:`load_weights`) are a one-line
:class:`DataError`, wherever they are loaded.

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


# The params.yaml keys under ``evaluate`` that validation during training reads (Trainer._validate):
# they pick best.pt and the early stop, so they are part of a phase's identity and its dvc.yaml params.
VALIDATION_KEYS = ("thresholds", "pool_sizes", "ssim")
# The source that shapes training, relative to CODE_ROOT: every *.py under a folder, or one file. The scores'
# code is in it: validation scores pick best.pt, stop early and are the study's objective.
CODE_ROOT = Path(__file__).resolve().parents[2]
CODE_PATHS = ("models", "pipeline/training", "pipeline/scoring", "pipeline/train.py")
# The windows files a phase reads, in windows.root.
DATA_FILES = ("train.h5", "val.h5")
# Windows files up to this size are hashed whole; a larger one by its layout, its small datasets and
# SAMPLE_FRAMES frames spread over it (reading gigabytes at every start would cost more than a resume saves).
WHOLE_FILE_BYTES = 64 * 2**20
SAMPLE_FRAMES = 64
IDENTITY_PARTS = ("params", "code", "data")
_PART_NAMES = {"params": "params", "code": "code (" + ", ".join(CODE_PATHS) + ")",
               "data": "data (" + ", ".join(DATA_FILES) + " in windows.root)"}  # fmt: skip


def params_hash(cfg: Any, phase: int, init: dict[str, Any] | None = None) -> str:
    """Hash of the params that shape phase ``phase``: model, data, windows, train (this phase's
    block), the validation scores (``evaluate`` keys in :data:`VALIDATION_KEYS`).

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
        "validation": cfg.evaluate.model_dump(mode="json", include=set(VALIDATION_KEYS)),
    }
    if init is not None:
        blob["init"] = {k: init.get(k) for k in ("identity", "config_hash", "epoch", "step", "best_score")}
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_hash(root: Path | None = None) -> str:
    """Hash of the training source: the sorted relative paths and bytes of :data:`CODE_PATHS`."""
    root = Path(root or CODE_ROOT)
    files: list[Path] = []
    for rel in CODE_PATHS:
        path = root / rel
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
    digest = hashlib.sha256()
    for path in sorted(set(files), key=lambda p: p.relative_to(root).as_posix()):
        body = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(body)}\0".encode())
        digest.update(body)
    return digest.hexdigest()[:16]


def data_fingerprint(windows_root: Path) -> str:
    """Fingerprint of the windows files a phase reads (:data:`DATA_FILES` in ``windows_root``), by content.

    A file up to :data:`WHOLE_FILE_BYTES` is hashed whole; a larger one by its size, HDF5 attributes,
    dataset shapes and types, its small datasets (event ids, times, window index) and
    :data:`SAMPLE_FRAMES` frames of ``vil`` spread over its rows. File times are not used: a DVC
    checkout or an experiment's temporary copy of the same bytes is the same data.
    """
    digest = hashlib.sha256()
    for name in DATA_FILES:
        path = Path(windows_root) / name
        digest.update(f"{name}\0{_file_digest(path)}\0".encode())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: windows file not found; run the chunk stage (dvc repro chunk)") from None
    if size <= WHOLE_FILE_BYTES:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    import h5py

    digest = hashlib.sha256(f"size {size}\0".encode())
    try:
        with h5py.File(path, "r") as h5:
            for key in sorted(h5.attrs):
                digest.update(f"attr {key}={h5.attrs[key]!r}\0".encode())
            for key in sorted(h5):
                ds = h5[key]
                digest.update(f"dataset {key} {ds.shape} {ds.dtype}\0".encode())
                if key != "vil":
                    digest.update(np.ascontiguousarray(ds[()]).tobytes())
            vil = h5["vil"]
            rows, frames = int(vil.shape[0]), int(vil.shape[1])
            total = rows * frames
            for flat in np.unique(np.linspace(0, total - 1, min(total, SAMPLE_FRAMES)).astype(np.int64)):
                digest.update(np.ascontiguousarray(vil[int(flat) // frames, int(flat) % frames]).tobytes())
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: not a windows file ({str(err).splitlines()[0][:120]}); rerun the chunk stage "
                        "(dvc repro chunk)") from None  # fmt: skip
    return digest.hexdigest()


def identity(cfg: Any, phase: int, init: dict[str, Any] | None = None) -> dict[str, str]:
    """What a phase-``phase`` checkpoint of ``cfg`` is made from: ``{"params", "code", "data"}``
    (:func:`params_hash`, :func:`code_hash`, :func:`data_fingerprint` of ``windows.root``)."""
    return {"params": params_hash(cfg, phase, init), "code": code_hash(), "data": data_fingerprint(cfg.windows.root)}


def identity_hash(ident: dict[str, str]) -> str:
    """One hash of an :func:`identity` (the checkpoint's ``config_hash``)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: Any, phase: int, init: dict[str, Any] | None = None) -> str:
    """The ``config_hash`` a phase-``phase`` checkpoint of ``cfg`` records: :func:`identity_hash` of :func:`identity`."""
    return identity_hash(identity(cfg, phase, init))


def stale_reason(state: dict[str, Any], current: dict[str, str], parts: tuple[str, ...] = IDENTITY_PARTS) -> str | None:
    """Why checkpoint ``state`` was not made from the ``current`` identity (its ``parts``), or None if it was:
    e.g. ``"other code (models, ...)"``, or for a checkpoint without an identity record, saying so."""
    stored = state.get("identity")
    if not isinstance(stored, dict):
        return f"unknown {' and '.join(_PART_NAMES[p] for p in parts)} (an older checkpoint without an identity record)"
    changed = [p for p in parts if stored.get(p) != current.get(p)]
    return f"other {' and '.join(_PART_NAMES[p] for p in changed)}" if changed else None


def weights_mismatch(expected: dict[str, Any], weights: Any) -> str | None:
    """What keeps ``weights`` (a state_dict) from loading into a model whose state_dict is ``expected``:
    missing / unexpected keys, shape mismatches (a few of each named); None when they fit."""
    if not isinstance(weights, dict):
        return f"a {type(weights).__name__}, not a state_dict"
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} {list(getattr(weights[k], 'shape', []))} vs {list(expected[k].shape)} in the model"
              for k in expected if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)]  # fmt: skip
    out = [f"{what} {_few(keys)}" for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                       ("shape mismatch", shapes)) if keys]  # fmt: skip
    return "; ".join(out) or None


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_weights(module: nn.Module, weights: Any, path: Path, what: str = "the model") -> None:
    """``module.load_state_dict(weights)``, or one-line :class:`DataError` naming ``path`` and what
    does not fit (keys, shapes) when the checkpoint was made by other code or params."""
    why = weights_mismatch(module.state_dict(), weights)
    if why is None:
        try:
            module.load_state_dict(weights)
            return
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            why = (lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__)[:200]
    raise DataError(f"{path}: weights do not fit {what} ({why}); the checkpoint was made by other code or params: "
                    "rerun dvc repro (it retrains the training stages)")  # fmt: skip


def rng_state() -> dict[str, Any]:
    """Every RNG the training touches, as tensors and plain lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },  # fmt: skip
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
            try:
                torch.save(state, fh)
            except RuntimeError as err:  # torch's zip writer reports a failed write (e.g. a full disk) as its own
                if isinstance(err.__context__, OSError):
                    raise err.__context__ from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:  # a write of an open file names no path: name the checkpoint
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def read_checkpoint(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``.

    A missing, truncated or foreign file raises :class:`DataError` with one line naming the
    path and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; run the training stage (dvc repro train_phase1) first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap or None)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: corrupt or unreadable checkpoint ({why[:160]}); delete it and rerun the "
                        "training stage") from None  # fmt: skip
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise DataError(f"{path}: not a format-{FORMAT} training checkpoint; delete it and rerun the training stage")
    return state


def check_phase(path: Path, phase: int, fix: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors mapped, not read), refused unless a phase-``phase`` one."""
    state = read_checkpoint(path, mmap=True)
    if state.get("phase") != phase:
        raise DataError(f"{path}: a phase-{state.get('phase')} checkpoint where a phase-{phase} one belongs; {fix}")
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
    load_weights(model, state["model"], path, f"model.name={stored.name}")
    return model.to(device).eval()


def _diff_keys(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    return [] if a == b else [prefix]
