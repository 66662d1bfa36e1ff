"""SEVIR nowcasting pipeline: the DVC stages and the library they share."""

import importlib.util as _util
import sys as _sys

# What every stage imports. A stage run by another Python than the project's venv (`dvc` called as
# .venv/bin/dvc without activating the venv runs the stages' `python` from PATH) stops here with one
# line instead of a ModuleNotFoundError traceback from deep inside a stage.
_REQUIRED = ("numpy", "torch", "h5py", "yaml", "pydantic", "mlflow", "optuna")
_missing = [name for name in _REQUIRED if _util.find_spec(name) is None]
if _missing:
    raise SystemExit(
        f"{_sys.executable} has no {', '.join(_missing)}: it is not the project's venv; run `make install` and "
        "`source .venv/bin/activate` (or use `make repro`), then run the command again"
    )
