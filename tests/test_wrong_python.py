"""A stage run by a Python without the project's packages stops with one line naming the fix."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.project import REPO


def test_a_python_without_the_venv_packages_gets_one_line_and_exit_1():
    # h5py hidden from this interpreter, as it is from a system Python that `dvc` picks up from PATH
    code = "import sys; sys.modules['h5py'] = None; import pipeline.train"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "has no h5py" in lines[0] and "source .venv/bin/activate" in lines[0] and sys.executable in lines[0]


def test_the_venv_imports_the_package_quietly():
    proc = subprocess.run([sys.executable, "-c", "import pipeline"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == ""
