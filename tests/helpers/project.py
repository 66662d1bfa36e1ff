"""Shared by the tests that build copies of the project (params overrides: pipeline.preset.merge)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def copy_project(dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy what a clone of the project holds (files git tracks, and untracked ones it does not
    ignore) into ``dest``, leaving out paths that start with any of ``skip``; returns ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True)  # fmt: skip
    for name in listed.stdout.splitlines():
        src = REPO / name
        if src.is_file() and not (skip and name.startswith(skip)):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest
