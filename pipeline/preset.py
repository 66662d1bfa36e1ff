"""Apply a preset: a params.yaml override file -> ``-S key=value`` arguments for ``dvc exp run``.

    dvc exp run $(python -m pipeline.preset presets/sevir_lr.yaml)
    python -m pipeline.preset presets/sevir_lr.yaml [--params params.yaml] [--format s|yaml]

A preset (``presets/*.yaml``) is a nested mapping holding a subset of params.yaml's keys. It is
checked against the config schema merged over ``--params`` (unknown keys, bad values and
combinations that do not fit, e.g. a frame size the model cannot take, stop with one line), then
printed as one ``-S dotted.key=value`` per leaf, on one line, for the shell to split. Values are
compact YAML/JSON (``[2,2]``, ``null``), so they need no quoting. ``--format yaml`` prints the
merged params instead (to review, or to write a params file for ``--params``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline import config as config_mod
from pipeline.cli import run_stage
from pipeline.errors import ConfigError


def read_preset(path: Path) -> dict[str, Any]:
    """The override mapping of a preset file; ConfigError with one line when it is not one."""
    if not path.is_file():
        raise ConfigError(f"{path}: preset not found; see presets/ for the ones there are")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: a preset is a mapping of params.yaml sections (windows:, data:, ...)")
    return raw


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, nested mappings key by key (neither is changed)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted.key, value)`` for every non-mapping value of ``tree``."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{name}.")
        else:
            yield name, value


def format_value(key: str, value: Any, source: Path) -> str:
    """A value as ``dvc exp run -S`` parses it (YAML), compact and with no whitespace."""
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?", value):
        value = dt.datetime.fromisoformat(value)  # a date-time with a space: written with a T instead
    if isinstance(value, dt.date):
        text = value.isoformat()
    elif isinstance(value, str):
        text = value if value and yaml.safe_load(value) == value else json.dumps(value)
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    if any(c.isspace() for c in text):
        raise ConfigError(f"{source}: {key}: value {value!r} contains whitespace, which $(...) would split; "
                          "write it without spaces (e.g. a date as 2019-01-01T00:00:00)")  # fmt: skip
    return text


def merged_params(preset: Path, params: Path) -> dict[str, Any]:
    """The params of ``params`` (empty when there is no such file) with ``preset`` merged in, unvalidated.

    The one merge every preset consumer goes through: ``python -m pipeline.preset``, ``python -m
    pipeline.summary --preset`` and (mirrored for the model section, since models imports nothing from
    pipeline) ``python -m models.summary --preset``.
    """
    base = yaml.safe_load(params.read_text()) if params.is_file() else {}
    return merge(base or {}, read_preset(preset))


def preset_config(preset: Path, params: Path) -> config_mod.Config:
    """The validated config of ``preset`` over ``params``; ConfigError with one line naming the key at fault."""
    return config_mod.from_dict(merged_params(preset, params), source=f"{preset} over {params}")


def overrides(preset: Path, params: Path) -> tuple[list[str], dict[str, Any]]:
    """(``-S key=value`` arguments, merged params) for ``preset`` over ``params``; validated."""
    tree = read_preset(preset)
    merged = merged_params(preset, params)
    preset_config(preset, params)  # one line naming the key at fault
    args = []
    for key, value in leaves(tree):
        args += ["-S", f"{key}={format_value(key, value, preset)}"]
    return args, merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=Path, help="a presets/*.yaml file")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="base params (default: params.yaml)")
    parser.add_argument("--format", choices=("s", "yaml"), default="s",
                        help="s: -S key=value arguments for dvc exp run (default); yaml: the merged params")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.params.is_file():
        raise ConfigError(f"{args.params}: params file not found; run from the repository root or pass --params")
    s_args, merged = overrides(args.preset, args.params)
    if args.format == "yaml":
        sys.stdout.write(yaml.safe_dump(merged, sort_keys=False))
    else:
        print(" ".join(s_args))


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
