"""Apply a params preset (presets/*.yaml) to a DVC experiment: print it as ``-S key=value`` overrides.

    dvc exp run $(python -m pipeline.preset presets/reference_sevir.yaml)

A preset is a YAML file shaped like params.yaml holding only the keys it changes. The command
merges it over ``--params`` (default params.yaml), validates the result with pipeline.config (an
invalid preset is one error line naming the key, exit code 2, and nothing printed on stdout, so
``dvc exp run $(...)`` does not start), then prints one ``-S dotted.key=value`` per leaf on one
line. Values are written in the override grammar ``dvc exp run -S`` takes: lists as ``[3,2]``,
booleans ``true`` / ``false``, ``null``; no spaces, so the shell's word splitting keeps each
override whole. ``--yaml`` prints the merged params instead (to inspect or to save as a file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.cli import run_stage
from pipeline.config import from_dict
from pipeline.errors import ConfigError


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: preset file not found; pass a path such as presets/reference_sevir.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, windows, ...)")
    return raw


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``extra`` merged in, nested mappings key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every non-mapping value, in file order."""
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += leaves(value, f"{name}.")
        else:
            out.append((name, value))
    return out


def override_value(value: Any) -> str:
    """A value in ``dvc exp run -S`` (Hydra) override syntax, without spaces."""
    if isinstance(value, str):
        if any(c in value for c in " ,[]{}=\"'") or value in ("true", "false", "null"):
            raise ConfigError(f"preset value {value!r} needs quoting, which a $(...) override cannot carry")
        return value
    return json.dumps(value, separators=(",", ":"))


def overrides(preset: Path, params: Path) -> list[str]:
    """Validate ``preset`` merged over ``params``; the ``-S`` arguments that apply it."""
    extra = read_yaml(preset)
    base = read_yaml(params) if params.is_file() else {}
    from_dict(merge(base, extra), source=f"{params} + {preset}")
    return [arg for key, value in leaves(extra) for arg in ("-S", f"{key}={override_value(value)}")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=Path, help="a presets/*.yaml file")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params to merge over")
    parser.add_argument("--yaml", action="store_true", help="print the merged params instead of -S overrides")
    args = parser.parse_args(argv)
    args_out = overrides(args.preset, args.params)
    if args.yaml:
        merged = merge(read_yaml(args.params) if args.params.is_file() else {}, read_yaml(args.preset))
        print(yaml.safe_dump(merged, sort_keys=False), end="")
    else:
        print(" ".join(args_out))


if __name__ == "__main__":
    sys.exit(run_stage(main))
