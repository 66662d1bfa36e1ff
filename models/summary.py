"""Parameter counts of every registered model at a model config.

    python -m models.summary [--preset presets/reference_sevir.yaml] [--params params.yaml] [--markdown FILE]

Builds each model from a :class:`~models.config.ModelConfig` with only ``model.name``
changed, and prints one Markdown table row per model: total parameters, those trained in
phase 1 only (the memory bank and the context encoder) and the rest. Without ``--preset``
the config is the defaults of ModelConfig. With ``--preset`` (a presets/*.yaml file) it is
the config the pipeline runs that preset with: the ``model`` section of ``--params``
(default params.yaml; the ModelConfig defaults when there is no such file) with the
preset's ``model`` section merged in key by key, nested mappings included, validated by
ModelConfig: the merge of :func:`pipeline.preset.merged_params`, restricted to the model
section, so ``python -m pipeline.summary --preset X`` counts the same models. This module
imports nothing from ``pipeline``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

import models
from models.config import ModelConfig


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """{'total', 'memory', 'phase2'} parameter counts of the model ``cfg`` builds."""
    torch.manual_seed(0)
    model = models.build(cfg)
    total = sum(p.numel() for p in model.parameters())
    memory = sum(p.numel() for p in model.memory_parameters())
    return {"total": total, "memory": memory, "phase2": total - memory}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, nested mappings key by key (pipeline.preset.merge's rule)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _model_section(path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text()) or {}
    section = raw.get("model", {}) if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{path}: expected a mapping with a 'model' section")
    return section


def config_from_preset(path: Path, params: Path | None = Path("params.yaml")) -> ModelConfig:
    """The ``model`` section of ``params`` (when that file exists) with the preset's merged in; ValueError names the key."""
    base = _model_section(params) if params is not None and params.is_file() else {}
    try:
        return ModelConfig(**_merge(base, _model_section(path)))
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in ("model", *first["loc"]))
        raise ValueError(f"{path}: {key}: {first['msg']}") from None


def table(cfg: ModelConfig) -> str:
    """A Markdown table of parameter counts, one row per registered model, at ``cfg`` with only the name changed."""
    lines = [
        "| model | parameters | phase 1 only (memory bank, context encoder) | trained in phase 2 |",
        "|---|---:|---:|---:|",
    ]
    for name in models.available():
        counts = count_parameters(cfg.model_copy(update={"name": name}))
        lines.append(f"| {name} | {counts['total']:,} | {counts['memory']:,} | {counts['phase2']:,} |")
    return "\n".join(lines)


def describe(cfg: ModelConfig, source: str) -> str:
    """One line naming the config the counts are for."""
    return (
        f"At {source}: embed_dim {cfg.embed_dim}, patch_size {cfg.patch_size}, window_size {cfg.window_size}, "
        f"depths_down {cfg.depths_down}, depths_up {cfg.depths_up}, heads {cfg.heads}, "
        f"convlstm.hidden {cfg.convlstm.hidden}, memory {cfg.memory.slots} x {cfg.memory.dim} "
        f"(read {cfg.memory.read}, fusion {cfg.memory.fusion}, encoders {cfg.memory.encoders}), "
        f"skips {str(cfg.skips).lower()}, head {cfg.head}, residual {str(cfg.residual).lower()}, pos {cfg.pos}."
    )


def report(cfg: ModelConfig, source: str, markdown: Path | None, command: str) -> str:
    """The description line and the table; also written to ``markdown`` (atomically) when given."""
    text = f"{describe(cfg, source)}\n\n{table(cfg)}\n"
    if markdown is not None:
        tmp = markdown.with_name(f".{markdown.name}.tmp")
        tmp.write_text(f"# Model sizes\n\nWritten by `{command}`.\n\n{text}")
        tmp.replace(markdown)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, default=None, help="a presets/*.yaml file (its model section)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="the params the preset is merged over (default: params.yaml)")  # fmt: skip
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_preset(args.preset, args.params) if args.preset is not None else ModelConfig()
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    if args.preset is None:
        source = "the ModelConfig defaults"
    else:  # named as python -m pipeline.summary names it
        base = f"`{args.params}`" if args.params.is_file() else "the ModelConfig defaults"
        source = f"{base} + `{args.preset}`"
    command = "python -m models.summary" + (f" --preset {args.preset}" if args.preset else "")
    print(report(cfg, source, args.markdown, command), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
