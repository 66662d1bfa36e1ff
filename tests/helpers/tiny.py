"""A tiny project that runs all six stages in seconds on a CPU: the repo's params.yaml with a 16-event
32x32 synthetic sample, 4 -> 4 windows, a small ConvLSTM, two-step epochs and a two-trial study.

Stages run as ``python -m pipeline.<stage> --params <root>/params.yaml`` with ``cwd=root`` (search
keeps its journal under ``<cwd>/artifacts/search`` and its reports in ``<cwd>/reports/search``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.preset import merge

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = {"name": "convlstm", "patch_size": 4, "window_size": 2, "depths_down": [1, 1], "depths_up": [1, 1],
              "heads": [2, 2], "embed_dim": 8, "residual": False, "motion": False,
              "prior": {"kind": "none"}, "convlstm": {"hidden": [4], "kernel_size": 3}}  # fmt: skip

STAGES: dict[str, list[str]] = {
    "fetch": ["pipeline.fetch"],
    "chunk": ["pipeline.chunk", "--stats", "reports/data/chunk_stats.json"],
    "train_phase1": ["pipeline.train", "--phase", "1"],
    "train_phase2": ["pipeline.train", "--phase", "2"],
    "evaluate": ["pipeline.evaluate"],
    "search": ["pipeline.search"],
}
ORDER = list(STAGES)


def tiny_params(root: Path) -> dict[str, Any]:
    """The repo's params.yaml with every path under ``root`` and everything small."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return merge(params, {
        "data": {"root": str(root / "data/raw"), "lock_wait_s": 0,
                 "synthetic": {"n_events": 16, "size": 32, "frames": 25, "events_per_file": 8}},
        "windows": {"in_len": 4, "out_len": 4, "stride": 4, "root": str(root / "data/windows"), "workers": 1},
        "model": TINY_MODEL,
        "train": {"device": "cpu", "batch_size": 2, "threads": 1, "checkpoint_dir": str(root / "artifacts"),
                  "log_every": 2, "val_max_batches": 1,
                  "phase1": {"epochs": 2, "max_steps_per_epoch": 2},
                  "phase2": {"epochs": 2, "max_steps_per_epoch": 2}},
        "evaluate": {"reports_dir": str(root / "reports"), "batch_size": 4, "max_batches": 2, "n_examples": 1,
                     "example_leads": [1, 4], "baselines": ["persistence"], "ssim": False},
        "search": {"n_trials": 2, "epochs": 1, "max_steps_per_epoch": 1, "val_max_batches": 1, "pruner": "none",
                   "heartbeat_s": 1, "grace_s": 5,
                   "space": [{"key": "train.phase1.lr", "type": "logfloat", "low": 1.0e-4, "high": 3.0e-3},
                             {"key": "model.convlstm.hidden", "type": "categorical", "choices": [[4], [6]]}]},
        "tracking": {"enabled": False},
    })  # fmt: skip


def write_params(root: Path, overrides: dict[str, Any] | None = None, name: str = "params.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(merge(tiny_params(root), overrides or {}), sort_keys=False))
    return path


def run_stage(stage: str, root: Path, params: Path | None = None, *extra: str, timeout: float = 600,
              wait: bool = True, code: Path = REPO) -> subprocess.CompletedProcess | subprocess.Popen:  # fmt: skip
    """``python -m pipeline.<stage>`` in ``root`` (one torch thread) with the code under ``code`` (a frozen
    copy keeps a long test immune to edits of the checkout); a Popen when ``wait`` is false."""
    cmd = [sys.executable, "-m", *STAGES[stage], "--params", str(params or root / "params.yaml"), *extra]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def build(root: Path, upto: str = "search") -> Path:
    """Run the stages in order up to ``upto`` (included) in a fresh tiny project under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(root)
    for stage in ORDER[: ORDER.index(upto) + 1]:
        proc = run_stage(stage, root)
        assert proc.returncode == 0, f"{stage} failed:\n{proc.stderr[-3000:]}"
    return root


def snapshot(root: Path, skip: tuple[str, ...] = ("params", ".lock")) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest), leaving out params files and lock files."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(part in path.name for part in skip):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
